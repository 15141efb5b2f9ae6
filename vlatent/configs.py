"""The one way a config dataclass is built from a user's mapping (recipes, saved configs): unknown keys are named
(with the nearest known key), never silently dropped, and every value is checked against its field's type."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing

YAML_BOOLS = {"yes": True, "on": True, "true": True, "y": True, "no": False, "off": False, "false": False, "n": False}


def check_keys(where: str, given, known) -> None:
    if unknown := sorted(set(given) - set(known)):
        close = {k: difflib.get_close_matches(k, list(known), 1, 0.6) for k in unknown}
        hint = "; ".join(f"did you mean {m[0]!r} for {k!r}?" for k, m in close.items() if m)
        raise ValueError(f"{where}: unknown key(s) {unknown}; " + (hint or f"known: {sorted(known)}"))


class _Mismatch(Exception):
    """A value that does not fit a type (the caller names the field)."""


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(e.value) for e in hint)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             list: "a list", dict: "a mapping", tuple: "a list"}
    return names.get(typing.get_origin(hint) or hint, str(hint))


def _coerce(value, hint):
    """``value`` as ``hint`` wants it; YAML 1.1 spellings (``1e-5`` as a string, ``no`` for false) are read back."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        for a in enums or [a for a in args if a is not type(None)]:  # an enum | str field takes the enum's values
            try:
                return _coerce(value, a)
            except _Mismatch:
                pass
        raise _Mismatch(_describe(enums[0] if enums else hint))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if value in {e.value for e in hint} or isinstance(value, hint):
            return value
    elif hint is bool:
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in YAML_BOOLS):
            return value if isinstance(value, bool) else YAML_BOOLS[value.lower()]
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise _Mismatch("a finite number")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else typing.Any
            return type(value)(_coerce(v, item) for v in value)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    else:  # typing.Any, callables, classes we do not check
        return value
    raise _Mismatch(_describe(hint))


def check_types(where: str, given: dict, cls) -> dict:
    """``given`` with every value checked (and YAML 1.1 spellings read back) against ``cls``'s field types; a
    ValueError names the field, the type it wants and the value."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in given.items():
        try:
            out[key] = _coerce(value, hints[key]) if key in hints else value
        except _Mismatch as e:
            raise ValueError(f"{where}: {key} must be {e}, got {value!r}") from None
    return out


def from_dict(cls, d: dict, where: str):
    """``cls(**d)`` for a dataclass ``cls``, refusing keys it has no field for and values of the wrong type."""
    check_keys(where, d, {f.name for f in dataclasses.fields(cls)})
    return cls(**check_types(where, d, cls))
