"""Experiment parameters typed by their fields: one rule for every field of every kind.

An experiment's fields are annotated (`only_correct: bool`, `layers: tuple[int, ...] |
None`, `positions: str | tuple[int, ...]`), and a value for a field, from Python, from a
stored spec or from the command line, is coerced to that type or refused with one line
naming the field, the value and what it accepts:

- `bool`: True or False, or the text true / false in any case (nothing else: not
  "no", not 1);
- `int`: an integer, or its text; never a float (4.0 is refused, not truncated);
- `float`: a finite number (an integer stays an integer), or its text;
- `str`: text, as given (`--set attribute=true` is the string "true");
- `tuple[X, ...]` / `list[X]`: a list or tuple, a JSON list ("[0, 5]"), or
  comma-separated text ("0,5", "resid_post,attn_out"); each entry an X;
- `X | None`: None; on the command line also the text none or null (any case);
- `A | B`: the first that takes the value, the text-taking `str` last (so the
  positions "3,-1" are integers and "each" is text);
- `Literal[...]`: one of the listed values.

Command-line text (`--set key=value` and the options that name a field) goes through
`from_text`, which differs from `coerce` only where text is ambiguous: none/null for an
optional field, and JSON for a field of a type this module does not know. Fields of
other types (a user's own class, `object`) are passed through unchecked.

Only types are checked here; which values make sense (known sites, positive windows)
stays with each kind's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import types
import typing
from functools import cache
from typing import Any, Literal, Union

from .errors import ConfigError

_INT_TEXT = re.compile(r"[+-]?\d+")
_NONE_TEXT = ("none", "null")


class _Refused(Exception):
    """A value a type does not take (turned into a ConfigError naming the field)."""


# -- the declared types -----------------------------------------------------------------


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Each dataclass field of `cls` with its resolved annotation (`object` where an
    annotation cannot be resolved, e.g. a name local to a function)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, AttributeError, TypeError, SyntaxError):  # a name out of reach: resolve field by field
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name, f.type)
        if isinstance(hint, str):
            hint = _resolve(hint, cls)
        out[f.name] = hint
    return out


def _resolve(annotation: str, cls: type) -> Any:
    module = sys.modules.get(cls.__module__)
    try:
        return eval(annotation, dict(vars(module)) if module else {})  # the class's own annotation
    except (NameError, AttributeError, TypeError, SyntaxError):
        return object


def _members(hint) -> tuple | None:
    """The members of a union (`A | B`, `Optional[A]`), or None if `hint` is not one."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _sequence(hint) -> tuple[type, tuple] | None:
    """(tuple or list, element types) of a sequence annotation; `(X, ...)` for
    `tuple[X, ...]`, `()` for a bare `tuple`."""
    origin = typing.get_origin(hint) or hint
    if origin in (tuple, list):
        return origin, typing.get_args(hint)
    return None


# -- what a type accepts, in words ---------------------------------------------------------


def describe(hint) -> str:
    """What `hint` accepts, for an error message ("true or false", "an integer")."""
    members = _members(hint)
    if members is not None:
        words = [describe(m) for m in members if m is not type(None)]
        if type(None) in members:
            words.append("none")
        return ", ".join(words[:-1]) + ", or " + words[-1] if len(words) > 1 else words[0]
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "text"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    sequence = _sequence(hint)
    if sequence is not None:
        element = _element_types(sequence[1])
        plural, example = _PLURAL.get(element[0] if len(set(element)) == 1 else None, ("values", "a,b"))
        return f"{plural}, comma-separated (e.g. {example}) or as a JSON list"
    if hint is dict or typing.get_origin(hint) is dict:
        return "a JSON object"
    return getattr(hint, "__name__", str(hint))


# how to name the entries of a list of each type, and an example of one
_PLURAL = {int: ("integers", "0,5,-1"), float: ("numbers", "0.5,2"), str: ("names", "a,b"),
           bool: ("true/false values", "true,false")}


def _element_types(args: tuple) -> tuple:
    if not args:
        return (object,)
    if len(args) == 2 and args[1] is Ellipsis:
        return (args[0],)
    return args


# -- coercion ---------------------------------------------------------------------------------


def coerce(name: str, value, hint, text: bool = False):
    """`value` as the type `hint` declares, or a ConfigError naming the parameter `name`,
    the value and what it accepts. `text`: the value is command-line text."""
    try:
        return _coerce(value, hint, text)
    except _Refused as refused:
        detail = f" ({refused})" if str(refused) else ""
        raise ConfigError(f"parameter {name} is {value!r}{detail}; give {describe(hint)}") from None


def from_text(cls: type, name: str, text: str):
    """The value of field `name` of experiment class `cls` given as command-line text."""
    hint = field_types(cls).get(name, object)
    return coerce(name, text, hint, text=True)


def coerce_params(cls: type, params: dict) -> dict:
    """`params` with each value of a field of `cls` coerced to the field's type (other
    keys unchanged, for the caller to refuse)."""
    hints = field_types(cls)
    return {key: coerce(key, value, hints[key]) if key in hints else value for key, value in params.items()}


def validate_fields(experiment) -> None:
    """Coerce every field of a constructed experiment in place (its `__post_init__`)."""
    for name, hint in field_types(type(experiment)).items():
        value = getattr(experiment, name)
        coerced = coerce(name, value, hint)
        if coerced is not value:
            object.__setattr__(experiment, name, coerced)


def _coerce(value, hint, text: bool):
    if hint is Any or hint is object:
        return _untyped(value, text)
    members = _members(hint)
    if members is not None:
        return _union(value, members, text)
    if hint is type(None):
        if value is None or (text and isinstance(value, str) and value.strip().lower() in _NONE_TEXT):
            return None
        raise _Refused("")
    if hint is bool:
        return _bool(value)
    if hint is int:
        return _int(value)
    if hint is float:
        return _float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Refused("")
    if typing.get_origin(hint) is Literal:
        return _literal(value, typing.get_args(hint), text)
    sequence = _sequence(hint)
    if sequence is not None:
        return _sequence_of(value, *sequence)
    if hint is dict or typing.get_origin(hint) is dict:
        if isinstance(value, str):
            value = _json(value)
        if isinstance(value, dict):
            return value
        raise _Refused("")
    return _untyped(value, text)


def _untyped(value, text: bool):
    """A field of a type not known here: as given; command-line text as JSON if it is JSON."""
    if text and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _union(value, members: tuple, text: bool):
    if type(None) in members and (value is None or (text and isinstance(value, str)
                                                    and value.strip().lower() in _NONE_TEXT)):
        return None
    # text-taking members last: "3,-1" is a list of integers before it is text
    ordered = [m for m in members if m is not type(None) and m is not str] + ([str] if str in members else [])
    last = _Refused("")
    for member in ordered:
        try:
            return _coerce(value, member, text)
        except _Refused as refused:
            last = refused
    # with one candidate (`X | None`), say what in the value it refused
    raise last if len(ordered) == 1 else _Refused("")


def _literal(value, choices: tuple, text: bool):
    for choice in choices:
        try:
            if _coerce(value, type(choice), text) == choice:
                return choice
        except _Refused:
            continue
    raise _Refused("")


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Refused("")


def _int(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    raise _Refused("")


def _float(value):
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if _INT_TEXT.fullmatch(text) else float(text)
        except ValueError:
            raise _Refused("") from None
    # an integer stays an integer: the value stored (and the run's identity) is what was given
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise _Refused("")


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise _Refused(f"not valid JSON: {error.msg}") from None


def _sequence_of(value, kind: type, args: tuple):
    entries_are_text = False
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _json(text)
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
            entries_are_text = True
    if not isinstance(value, (list, tuple)):
        raise _Refused("")
    if args and not (len(args) == 2 and args[1] is Ellipsis):  # fixed length: tuple[int, str]
        if len(value) != len(args):
            raise _Refused(f"{len(value)} entries, not {len(args)}")
        element_types = args
    else:
        element_types = _element_types(args) * len(value)
    out = []
    for entry, element in zip(value, element_types):
        try:
            out.append(_coerce(entry, element, entries_are_text))
        except _Refused:
            raise _Refused(f"entry {entry!r} is not {describe(element)}") from None
    return kind(out)
