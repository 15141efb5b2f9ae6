"""The one way a config dataclass is built from a user's mapping (recipes, saved configs): unknown keys are named,
never silently dropped."""

from __future__ import annotations

import dataclasses


def check_keys(where: str, given, known) -> None:
    if unknown := sorted(set(given) - set(known)):
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def from_dict(cls, d: dict, where: str):
    """``cls(**d)`` for a dataclass ``cls``, refusing keys it has no field for."""
    check_keys(where, d, {f.name for f in dataclasses.fields(cls)})
    return cls(**d)
