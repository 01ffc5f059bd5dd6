"""Job configs: one keyword-only dataclass per job, filled from CLI flags and an optional TOML file.

Each field carries its help text in ``metadata["help"]`` (shown by ``--help``). Values come from,
in increasing priority: the dataclass default, the TOML file (``--config``), explicit CLI flags.
An unknown TOML key is an error; validation lives in each dataclass's ``__post_init__``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
import typing
from typing import Any, TypeVar

from pipelines.runtime.redact import redact

T = TypeVar("T")


def option(default: Any, help: str, *, flag: str | None = None, **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with CLI help text (and optionally a custom flag name)."""
    meta = {"help": help}
    if flag:
        meta["flag"] = flag
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field; the default is shown but left unset (SUPPRESS)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        origin = typing.get_origin(typ)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if typ is bool:
            parser.add_argument(_flag(f), action=argparse.BooleanOptionalAction, **kw)
        elif origin is list:
            (item,) = typing.get_args(typ)
            parser.add_argument(_flag(f), action="append", type=item, metavar=item.__name__.upper(), **kw)
        else:
            base = [a for a in typing.get_args(typ) if a is not type(None)][0] if origin else typ
            parser.add_argument(_flag(f), type=base, metavar=base.__name__.upper(), **kw)
    parser.add_argument("--config", dest="_config_file", default=None, metavar="TOML",
                        help="read options from a TOML file (keys are the option names with underscores); "
                             "flags given on the command line win")


def config_from_args(cls: type[T], ns: argparse.Namespace) -> T:
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    path = getattr(ns, "_config_file", None)
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values.update(data)
    values.update({k: v for k, v in vars(ns).items() if k in names})
    return cls(**values)


def parse_config(cls: type[T], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> T:
    """Parse argv into ``cls``; a bad value or file becomes a one-line ``error:`` and exit 2."""
    add_config_arguments(parser, cls)
    ns = parser.parse_args(argv)
    try:
        return config_from_args(cls, ns)
    except (ValueError, TypeError, OSError, tomllib.TOMLDecodeError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
        raise  # unreachable


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Print a one-line error and exit: how every job reports bad input before work starts. URLs in it are
    redacted (an error often names the input it could not read)."""
    print(f"error: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)
