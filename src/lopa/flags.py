"""CLI flags derived from DecodeConfig's field declarations (config.py), so a new field is a flag of every
command that takes it without being listed again.

``@decode_flags("generate")`` replaces a command's ``decode`` parameter by one ``--field`` option per field the
front end takes (config.settings); the command receives ``decode``: the fields the user set. With
``lists=True`` (`lopa eval`) a sweep field takes a comma-separated list and arrives as a list of values.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Optional

import typer
from rich.markup import escape

from .config import LLADA_DEFAULTS, STRATEGY_DEFAULTS, DecodeConfig, base_type, settings
from .errors import ConfigError

DEFAULTS = DecodeConfig()  # the one set of decoding defaults every command starts from


def default_help(name: str, what: str = "") -> str:
    """Help text ending in the field's default: DecodeConfig's, LLaDA's where it differs, a strategy's own, or
    the --preset's. A field whose default is None says its default in its own help."""
    value = getattr(DEFAULTS, name)
    if value is None:
        return what
    llada = f"; LLaDA models {LLADA_DEFAULTS[name]}" if name in LLADA_DEFAULTS and LLADA_DEFAULTS[name] != value else ""
    own = "".join(f"; {strategy} {d[name]}" for strategy, d in STRATEGY_DEFAULTS.items() if name in d)
    return f"{what} \\[default: {value}{llada}{own}; or the --preset's]".strip()  # \\[: not Rich markup


def parse_list(name: str, text: str, kind: type) -> list:
    """A comma-separated flag ('7,14') as values of ``kind``; '' gives []. A value given twice is an error (it
    would name the same run twice)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [_bool(p) if kind is bool else kind(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{name}: must be a comma-separated list of {kind.__name__} values, got {text!r}") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: a value is listed twice in {text!r}")
    return values


def _bool(text: str) -> bool:
    """'true' / 'false' (also 1/0, yes/no, on/off; any case) as a bool: bool('false') would be True."""
    words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def _option(field, lists: bool) -> inspect.Parameter:
    what, kind = escape(field.metadata["help"]), base_type(field)
    if lists and field.metadata["sweep"]:
        what, kind = what + " A comma-separated list runs each value.", str
    help_text = default_help(field.name, what)
    names = (f"--{field.name.replace('_', '-')}/--no-{field.name.replace('_', '-')}",) if kind is bool else ()
    return inspect.Parameter(field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[kind],
                             default=typer.Option(None, *names, help=help_text))


def decode_flags(front_end: str, fail, lists: bool = False):
    """Give the decorated command one flag per DecodeConfig field ``front_end`` takes, in place of its
    ``decode`` parameter; it is called with ``decode={field: value}`` for the flags the user set (sweep
    fields as lists when ``lists``). A list that does not parse goes to ``fail(error)`` (the CLI's one line)."""
    fields = settings(front_end)

    def wrap(command):
        hints = typing.get_type_hints(command)
        params = []
        for p in inspect.signature(command).parameters.values():
            if p.name == "decode":
                params += [_option(f, lists) for f in fields]
            else:
                params.append(p.replace(annotation=hints[p.name]))

        @functools.wraps(command)
        def run(**kwargs):
            decode = {f.name: kwargs.pop(f.name) for f in fields}
            try:
                for f in fields:
                    if lists and f.metadata["sweep"] and decode[f.name] is not None:
                        decode[f.name] = parse_list(f.name, decode[f.name], base_type(f))
            except ConfigError as err:
                fail(err)
            return command(**kwargs, decode={name: v for name, v in decode.items() if v is not None})

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap
