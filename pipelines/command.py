"""Run a command module (`NAME`, `HELP`, `configure(parser)`, `run(args)`): logging set up once, bad input and
failed jobs as one line on stderr with exit 1 (`SSJDN_DEBUG=1` shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import ModuleType

from pipelines.errors import USER_ERRORS
from pipelines.logfile import route_library_logs

NOISY_LOGGERS = ("httpx", "httpcore", "botocore", "aiobotocore", "s3fs")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # one line per HTTP request (Prefect API, S3) buries what the job itself says
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)


def run_command(args: argparse.Namespace) -> int:
    """Call the parsed command's `run`; a user error becomes one line and exit code 1.

    Ray's and transformers' messages go to a log file (`pipelines.logfile`), named on stderr when it is written."""
    if not os.environ.get("SSJDN_LIBRARY_LOGS_ON_CONSOLE"):
        route_library_logs(getattr(args, "_name", "ssjdn"))
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        if os.environ.get("SSJDN_DEBUG"):
            raise
        # Printed, not logged: the one line must reach the user whatever the logging setup.
        print(f"{args._name}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{args._name}: interrupted", file=sys.stderr, flush=True)
        return 130


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def add_command(sub, module: ModuleType) -> argparse.ArgumentParser:
    p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
    module.configure(p)
    p.set_defaults(_run=module.run, _name=f"ssjdn {module.NAME}")
    return p


def module_main(module: ModuleType, argv: list[str] | None = None, prog: str | None = None) -> int:
    """`python -m pipelines.<job>`: the same parser and error handling as `ssjdn <job>`."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog=prog or f"python -m {module.__package__}", description=module.HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.configure(parser)
    parser.set_defaults(_run=module.run, _name=parser.prog)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command(args)
