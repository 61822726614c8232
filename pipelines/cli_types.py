"""argparse value types shared by the subcommands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A whole number >= 1; scientific notation is fine when it is whole (`--maxsize 1e9`), 1.5 is not."""
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not number.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        value = int(number)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value
