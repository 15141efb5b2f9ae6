"""MMMU and MMStar scoring that gives the judgements of the official code, for one response or a whole run.

``judge`` is the single entry for one judgement (eval runner, RL rewards, hand checks); ``parse`` returns what
was extracted and how, so reports can count MMMU's random fallbacks. Rules: ``mmmu.py`` mirrors
MMMU-Benchmark/MMMU ``eval/eval_utils.py``; ``mmstar.py`` mirrors VLMEvalKit's exact matching. Pure Python,
no heavy imports.

    >>> judge("mmstar", "The answer is (C).", "C", options=["cat", "dog", "bird", "fish"])
    True
    >>> judge("mmmu", "x = 3.0 cm", "3", question_type="open")
    True
"""

from __future__ import annotations

import random
from typing import Sequence

from . import mmmu, mmstar
from .common import ParsedAnswer, unwrap_boxed
from .mmmu import mmmu_scores
from .mmstar import mmstar_gain_leakage, mmstar_scores

BENCHMARKS = ("mmmu", "mmstar")
QUESTION_TYPES = {"mmmu": ("multiple-choice", "open"), "mmstar": ("multiple-choice",)}


def _check(benchmark: str, question_type: str) -> str:
    name = benchmark.lower() if isinstance(benchmark, str) else benchmark
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    if question_type not in QUESTION_TYPES[name]:
        raise ValueError(f"unknown question_type {question_type!r} for {name}; "
                         f"expected one of {', '.join(QUESTION_TYPES[name])}")
    return name


def parse(
    benchmark: str,
    response: str,
    options: Sequence[str] | None = None,
    question_type: str = "multiple-choice",
    seed: int = mmmu.DEFAULT_SEED,
    *,
    rng: random.Random | None = None,
    unwrap_boxed: bool = False,
) -> ParsedAnswer:
    """Extract the answer from ``response`` as the official scorer of ``benchmark`` ("mmmu" or "mmstar") does.

    ``options``: option texts in order A, B, ... (needed for multiple choice). ``question_type``:
    "multiple-choice" or, for MMMU, "open". MMMU's random fallback (nothing parsed) draws from ``rng`` if given,
    else from ``random.Random(seed)`` (seed 42, as the official module), so a single call is reproducible; the
    result has ``fallback=True``. ``unwrap_boxed``: opt-in, non-official ``\\boxed{X}`` -> ``X`` first.
    """
    name = _check(benchmark, question_type)
    if name == "mmmu":
        return mmmu.parse(response, options, question_type, seed=seed, rng=rng, unwrap=unwrap_boxed)
    return mmstar.parse(response, options, unwrap=unwrap_boxed)


def judge(
    benchmark: str,
    response: str,
    gold: str | Sequence[str],
    options: Sequence[str] | None = None,
    question_type: str = "multiple-choice",
    *,
    seed: int = mmmu.DEFAULT_SEED,
    rng: random.Random | None = None,
    unwrap_boxed: bool = False,
) -> bool:
    """Whether ``response`` is judged correct against ``gold`` by the official rules of ``benchmark``.

    ``gold``: the option letter for multiple choice (MMMU also takes a list of letters); for MMMU open questions
    the gold answer string or a list of acceptable strings. An MMMU response that parses to nothing is judged on
    the random fallback letter, as the official code does (see ``parse`` for the seed / ``rng``).
    Unknown benchmark or question type -> ``ValueError``.
    """
    parsed = parse(benchmark, response, options, question_type, seed, rng=rng, unwrap_boxed=unwrap_boxed)
    if benchmark.lower() == "mmmu":
        return mmmu.judge(parsed, gold)
    return mmstar.judge(parsed, gold)


__all__ = [
    "BENCHMARKS",
    "QUESTION_TYPES",
    "ParsedAnswer",
    "judge",
    "mmmu_scores",
    "mmstar_gain_leakage",
    "mmstar_scores",
    "parse",
    "unwrap_boxed",
]
