"""A job's options, written once: a dataclass whose fields carry their command-line flag and help.

    @dataclass(frozen=True)
    class ShardJobOptions:
        dataset: str = option(positional=True, metavar="DATASET", help="dataset folder")
        maxcount: int = option(1000, type=positive_int, help="samples per shard at most")

    add_arguments(parser, ShardJobOptions)           # argparse, from the fields
    opts = from_args(ShardJobOptions, args)          # argparse.Namespace -> options
    opts = from_flat(ShardJobOptions, params)        # a Prefect flow's flat parameters -> options
    argv = options_to_argv(opts)                     # options -> the command line that builds them again

`flat_parameters(Options)` gives a Prefect flow function the fields as flat parameters (so
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
REQUIRED = inspect.Parameter.empty  # an `extra` flow parameter without a default


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
    unparse: Callable[[Any], list[str]] | None = None,
    default_factory: Callable[[], Any] | None = None,
    cli: bool = True,
    flow: bool = True,
) -> Any:
    """A dataclass field that knows its command-line form.

    `action="append"` collects a repeatable flag into a list; `parse` turns the command-line value (or a flow
    parameter) into the field's value (e.g. ["k=v", ...] -> dict). `cli=False` / `flow=False` keep a field
    out of the command line / the flow's parameters (it still exists in the Python API). `unparse` is the
    inverse of `parse` for `options_to_argv`: the field's value -> its command-line values (one per repetition
    of an `append` flag; default: `str` of each list item, or of the value).
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
        "unparse": unparse,
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
    """Options from a flow's flat parameters (values already typed by Prefect, so `parse` does not apply)."""
    values = {}
    for f in _fields(cls):
        if f.name not in params:
            continue
        values[f.name] = params[f.name]
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
        if f.metadata["action"] == "append" and default in ([], {}):
            default, annotation = None, annotation | None
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=annotation,
                default=inspect.Parameter.empty if default is _MISSING else default,
            )
        )
    for name, (annotation, default) in extra.items():
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation, default=default
            )
        )
    # Required parameters first (in `extra`'s order), so `flow(archive, store, ...)` binds positionally.
    params.sort(key=lambda p: p.default is not inspect.Parameter.empty)
    signature = inspect.Signature(params)
    field_names = {f.name for f in fields}

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any):
            given = signature.bind(*args, **kwargs).arguments
            opts = from_flat(cls, {k: v for k, v in given.items() if k in field_names and v is not None})
            flat = {name: given.get(name, default) for name, (_, default) in extra.items()}
            return fn(opts, **flat)

        del wrapper.__wrapped__  # inspect.signature must see the flat parameters, not fn's
        wrapper.__signature__ = signature
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def options_to_argv(opts) -> list[str]:
    """The command line that `add_arguments` + `from_args` turn back into `opts` (fields at their default are left
    out). For handing options to another process, e.g. a `ray job submit` entrypoint.

    Raises ValueError for a value the command line cannot express (a field with `cli=False` or a None in a field
    whose default is not None)."""
    positional: list[str] = []
    argv: list[str] = []
    for f in _fields(type(opts)):
        m, value, default = f.metadata, getattr(opts, f.name), _default(f)
        if value == default and not m["positional"]:
            continue
        if not m["cli"]:
            raise ValueError(f"option {f.name}={value!r} has no command-line form")
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        if m["action"] in ("store_true", "store_false"):
            argv.append(flag)  # not the default, so the flag's own value
            continue
        if value is None:
            raise ValueError(f"option {f.name}=None has no command-line form (its default is {default!r})")
        if m["unparse"]:
            values = list(m["unparse"](value))
        elif m["action"] == "append":
            values = [str(v) for v in value]
        else:
            values = [str(value)]
        if m["positional"]:
            positional += values
        elif m["action"] == "append":
            argv += [part for v in values for part in (flag, v)]
        else:
            (one,) = values
            argv += [flag, one]
    return positional + argv
