"""How much of a written reasoning trace is right, step by step: the sentences that name a grid cell ("Start at row 1,
column 3.", "D goes down to row 2, column 3: ice.", "Go left 2 to row 4, column 1.") against the same sentences of
the record's reference trace (``meta.text_cot``), in order.

An answer alone cannot tell a model that misreads the start from one that reads the picture and then walks wrong;
the first cell sentence is where the trace says the walk starts (perception), the later ones each step of the walk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..generation import LATENT_MARKER_PATTERN

CELL = re.compile(r"row \d+, column \d+")


def cell_sentences(text: str) -> list[str]:
    """The sentences of ``text`` that name a cell, in order (a sentence ends at a full stop or a latent segment)."""
    return [s.strip() for s in re.split(r"(?<=\.)\s*", LATENT_MARKER_PATTERN.sub(" ", text or "")) if CELL.search(s)]


@dataclass
class TraceCheck:
    """One output against its reference: was the first cell sentence right, how many later ones were right in their
    position, and was the whole walk reproduced exactly (no sentence missing, wrong or extra)."""

    start: bool
    steps_right: int
    steps: int  # the reference's cell sentences after the first
    exact: bool


def check_trace(reference: str, output: str) -> TraceCheck | None:
    """``output``'s cell sentences against ``reference``'s, position by position; None when the reference names no
    cell (nothing to check)."""
    want, got = cell_sentences(reference), cell_sentences(output)
    if not want:
        return None
    right = [i < len(got) and got[i] == w for i, w in enumerate(want)]
    return TraceCheck(start=right[0], steps_right=sum(right[1:]), steps=len(want) - 1,
                      exact=all(right) and len(got) == len(want))


def trace_scores(references: dict[str, str], predictions: list[dict]) -> dict | None:
    """Shares over ``predictions`` (rows with ``id`` and ``output``) whose id has a reference trace naming cells:
    ``start`` (first cell sentence right), ``steps`` (later cell sentences right, over all of them), ``exact`` (the
    whole walk right) and ``n`` (outputs checked); None when there is nothing to check."""
    checks = [c for p in predictions if p.get("id") in references
              for c in [check_trace(references[p["id"]], p.get("output") or "")] if c is not None]
    if not checks:
        return None
    steps = sum(c.steps for c in checks)
    return {"start": sum(c.start for c in checks) / len(checks),
            "steps": sum(c.steps_right for c in checks) / steps if steps else None,
            "exact": sum(c.exact for c in checks) / len(checks), "n": len(checks)}
