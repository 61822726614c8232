"""A job's options, written once: a dataclass whose fields carry their command-line flag and help.

    @dataclass(frozen=True)
    class ShardJobOptions:
        dataset: str = option(positional=True, metavar="DATASET", help="dataset folder")
        maxcount: int = option(1000, type=positive_int, help="samples per shard at most")

    add_arguments(parser, ShardJobOptions)           # argparse, from the fields
    opts = from_args(ShardJobOptions, args)          # argparse.Namespace -> options
    opts = from_flat(ShardJobOptions, params)        # a Prefect flow's flat parameters -> options

`flat_parameters(Options)` gives a Prefect flow function the fields as flat keyword parameters (so
`prefect deployment run ... -p maxcount=200` works) without writing the list out again.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    flag: str | None = None,
    positional: bool = False,
    metavar: str | None = None,
    type: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    action: str | None = None,
    parse: Callable[[Any], Any] | None = None,
    default_factory: Callable[[], Any] | None = None,
    cli: bool = True,
    flow: bool = True,
) -> Any:
    """A dataclass field that knows its command-line form.

    `action="append"` collects a repeatable flag into a list; `parse` turns the command-line value (or a flow
    parameter) into the field's value (e.g. ["k=v", ...] -> dict). `cli=False` / `flow=False` keep a field
    out of the command line / the flow's parameters (it still exists in the Python API).
    """
    meta = {
        "help": help,
        "flag": flag,
        "positional": positional,
        "metavar": metavar,
        "type": type,
        "choices": choices,
        "action": action,
        "parse": parse,
        "cli": cli,
        "flow": flow,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("help") is not None]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one argument per option field of `cls` (positional fields first, in field order)."""
    for f in _fields(cls):
        m = f.metadata
        if not m["cli"]:
            continue
        kwargs: dict[str, Any] = {"help": m["help"]}
        if m["metavar"]:
            kwargs["metavar"] = m["metavar"]
        if m["choices"]:
            kwargs["choices"] = m["choices"]
        if m["positional"]:
            parser.add_argument(f.name, **kwargs, **({"type": m["type"]} if m["type"] else {}))
            continue
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        default = _default(f)
        if m["action"] == "store_true":
            parser.add_argument(flag, dest=f.name, action="store_true", help=m["help"])
            continue
        if m["action"] == "store_false":
            parser.add_argument(flag, dest=f.name, action="store_false", help=m["help"])
            continue
        if m["action"] == "append":
            kwargs["action"] = "append"
            kwargs["default"] = []
        else:
            kwargs["default"] = None if default is _MISSING else default
            kwargs["required"] = default is _MISSING
        if m["type"]:
            kwargs["type"] = m["type"]
        parser.add_argument(flag, dest=f.name, **kwargs)


def from_args(cls, args: argparse.Namespace, **extra: Any):
    """Options from parsed arguments; `extra` sets fields that have no command-line form."""
    values: dict[str, Any] = {}
    for f in _fields(cls):
        if not f.metadata["cli"] or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        parse = f.metadata["parse"]
        values[f.name] = parse(value) if parse else value
    return cls(**values, **extra)


def from_flat(cls, params: dict[str, Any], **extra: Any):
    """Options from a flow's flat parameters (values already typed by Prefect; `parse` still applies)."""
    values = {}
    for f in _fields(cls):
        if f.name not in params:
            continue
        value, parse = params[f.name], f.metadata["parse"]
        values[f.name] = parse(value) if parse and value is not None else value
    return cls(**values, **extra)


def flat_parameters(
    cls,
    *,
    exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    extra: dict[str, tuple[Any, Any]] | None = None,
):
    """Decorate `fn(opts, **extra)` into a function of flat keyword parameters: the option fields of `cls`
    (minus `exclude` and fields with `flow=False`) plus `extra` ({name: (annotation, default)}).

    Prefect reads the parameters from the signature; `defaults` overrides a field's default for the flow
    (e.g. no progress bar in a flow run)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    extra = extra or {}
    fields = [f for f in _fields(cls) if f.name not in exclude and f.metadata["flow"]]
    params = []
    for f in fields:
        default = defaults.get(f.name, _default(f))
        annotation = hints[f.name]
        if f.metadata["action"] == "append" and default == []:
            default, annotation = None, annotation | None
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=annotation,
                default=inspect.Parameter.empty if default is _MISSING else default,
            )
        )
    for name, (annotation, default) in extra.items():
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        )
    # Required parameters first: Prefect (and humans reading the signature) expect them there.
    params.sort(key=lambda p: p.default is not inspect.Parameter.empty)
    field_names = {f.name for f in fields}

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(**kwargs: Any):
            opts = from_flat(cls, {k: v for k, v in kwargs.items() if k in field_names and v is not None})
            return fn(opts, **{k: v for k, v in kwargs.items() if k in extra})

        del wrapper.__wrapped__  # inspect.signature must see the flat parameters, not fn's
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
