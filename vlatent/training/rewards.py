"""Rewards for VLPO, with TRL's reward signature ``fn(completions, **columns) -> list[float | None]``.

``completions`` are the answers' text (latent segments left out); ``columns`` are the record's fields, one list entry
per completion: ``prompts``, ``answer``, ``options`` (``meta.options``), ``question_type``, ``task``, ``id``, ``meta``,
and ``generations`` (the ``vlatent.generation.Generation`` objects, for rewards that look at the latent segments).
Unknown columns must be accepted (``**kwargs``), as in TRL. ``None`` means "does not apply to this completion"; a
completion whose every reward is ``None`` is an error.

Built-in rewards:

- ``accuracy`` (1.0 / 0.0) through ``vlatent.scoring``: multiple choice (records with ``options``) by VLMEvalKit's
  exact matching (``judge("mmstar", ...)``, never a random letter); a bare option letter without listed options
  ("Answer A or B", the ``depth`` task) by the same option-letter rule; everything else (numbers, the synthetic tasks'
  words) by MMMU's open-question rule (``judge("mmmu", ..., question_type="open")``: numbers equal after rounding to
  two decimals, a word when the gold answer occurs in one of the response's key phrases; as in MMMU a short gold
  word can match inside a longer one, e.g. "no" inside "know").
- ``format`` (1.0 / 0.0): the answer is stated as the records state it, "The answer is X".

Monet's released RL reward (NOVAglow646/Monet@0893999 RL/examples/reward_function/monet_reward_function.py:31-67,
``0.9 x accuracy + 0.1 x format - 0.001 x length penalty``) as three rewards, weighted in the recipe:

- ``boxed_accuracy`` (1.0 / 0.0): the content of the last ``\boxed{...}`` (braces may nest, as mathruler's
  ``extract_boxed_content``), else the whole completion, judged as ``accuracy`` judges. The release grades with
  mathruler's ``grade_answer``, then asks an API model about what the rules reject; neither is done here.
- ``boxed_format`` (1.0 / 0.0): a ``\boxed{...}`` occurs, after spaces around ``<``, ``>``, ``/`` are removed.
- ``length_penalty`` (<= 0): ``-(steps - reference)`` where the completion's generated steps exceed
  ``meta.reference_length`` (a positive reference length; ``None`` without one).
- ``repetition_penalty`` (-1.0 / 0.0): -1 where a wrong completion (``boxed_accuracy`` 0) repeats itself: a sentence
  (text between ``.``, ``!``, ``?`` or newlines, spaces collapsed, at least 3 words) occurs ``REPETITIONS`` (3) times
  or more. The release asks an API model whether a wrong answer "contains repeatedly illogical contents" and then
  scores its accuracy -1 instead of 0 (RL/tools/api_judge.py:20-28, 89-96; monet_reward_function.py:240-244), i.e.
  -0.9 on the total: weight this reward 0.9 beside ``boxed_accuracy``. The rule here stands in for that judge.

Register your own with ``@register_reward("name")`` (or name a ``module:function`` in the recipe).
"""

from __future__ import annotations

import importlib
import re
import string
from typing import Callable

from ..scoring import judge
from ..scoring.mmstar import can_infer_option

RewardFunc = Callable[..., list]

_REWARDS: dict[str, RewardFunc] = {}


def register_reward(name: str):
    """Decorator: make ``fn(completions, **columns) -> list[float | None]`` available to recipes as ``name``."""

    def add(fn: RewardFunc) -> RewardFunc:
        if not callable(fn):
            raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        _REWARDS[name] = fn
        return fn

    return add


def list_rewards() -> list[str]:
    return sorted(_REWARDS)


def get_reward(name: str) -> RewardFunc:
    """A registered reward by name, or ``package.module:function``."""
    if name in _REWARDS:
        return _REWARDS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module!r} ({e})") from None
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        return fn
    raise ValueError(f"unknown reward {name!r}; registered: {', '.join(list_rewards())} (or give module:function)")


def _correct(completion: str, answer, options, question_type) -> bool:
    gold = str(answer).strip()
    if options:
        return judge("mmstar", completion, gold, options=list(options))
    if len(gold) == 1 and gold in string.ascii_uppercase:  # "Answer A or B": an option letter, options not listed
        letters = string.ascii_uppercase[: string.ascii_uppercase.index(gold) + 1]
        return can_infer_option(completion, {letter: letter for letter in max(letters, "AB", key=len)}) == gold
    return judge("mmmu", completion, [str(a) for a in answer] if isinstance(answer, list) else gold,
                 question_type="open")


@register_reward("accuracy")
def accuracy_reward(completions: list[str], answer: list, options: list | None = None,
                    question_type: list | None = None, **kwargs) -> list[float | None]:
    """1.0 where the completion's answer is judged right against the record's ``answer`` (``None`` without one)."""
    options = options or [None] * len(completions)
    question_type = question_type or [None] * len(completions)
    return [None if gold in (None, "") else float(_correct(c, gold, o, q))
            for c, gold, o, q in zip(completions, answer, options, question_type)]


_ANSWER_IS = re.compile(r"\banswer is\s*:?\s*\S", re.IGNORECASE)


@register_reward("format")
def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 where the completion states an answer as "The answer is X"."""
    return [float(bool(_ANSWER_IS.search(c))) for c in completions]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, braces balanced; ``None`` without a closed one."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth = 0
    for i in range(start + len("\\boxed{"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[start + len("\\boxed{") : i].strip()
            depth -= 1
    return None


@register_reward("boxed_accuracy")
def boxed_accuracy_reward(completions: list[str], answer: list, options: list | None = None,
                          question_type: list | None = None, **kwargs) -> list[float | None]:
    """1.0 where the last ``\\boxed{}`` content (else the whole completion) is judged right (Monet's accuracy)."""
    answers = [c if (boxed := last_boxed(c)) is None else boxed for c in completions]
    return accuracy_reward(answers, answer, options, question_type)


_BOXED = re.compile(r"\\boxed\{.*?\}", re.DOTALL)


@register_reward("boxed_format")
def boxed_format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 where the completion holds a ``\\boxed{...}`` (Monet's format reward)."""
    return [float(bool(_BOXED.search(re.sub(r"\s*(<|>|/)\s*", r"\1", c)))) for c in completions]


@register_reward("length_penalty")
def length_penalty_reward(completions: list[str], generations: list, meta: list, **kwargs) -> list[float | None]:
    """``-(steps - reference)`` where the generated steps exceed ``meta.reference_length``, else 0 (Monet's length
    penalty, weighted 0.001 there); ``None`` where the record gives no positive reference length."""
    out = []
    for g, m in zip(generations, meta):
        reference = (m or {}).get("reference_length")
        out.append(None if not reference or reference <= 0 else -float(max(g.num_steps - reference, 0)))
    return out


REPETITIONS = 3  # a sentence this many times makes a completion repetitive
_SENTENCE_END = re.compile(r"[.!?\n]+")


def repeats_itself(text: str, times: int = REPETITIONS) -> bool:
    """Whether a sentence of at least 3 words occurs ``times`` times or more in ``text`` (case and spaces ignored)."""
    counts: dict[str, int] = {}
    for sentence in _SENTENCE_END.split(text):
        words = sentence.lower().split()
        if len(words) >= 3:
            key = " ".join(words)
            counts[key] = counts.get(key, 0) + 1
            if counts[key] >= times:
                return True
    return False


@register_reward("repetition_penalty")
def repetition_penalty_reward(completions: list[str], answer: list, options: list | None = None,
                              question_type: list | None = None, **kwargs) -> list[float | None]:
    """-1.0 where the completion is wrong (``boxed_accuracy`` 0) and repeats a sentence, else 0 (Monet's repetition
    penalty, its API judge's -1 replaced by a rule); ``None`` where the record has no answer."""
    right = boxed_accuracy_reward(completions, answer, options, question_type)
    return [None if r is None else -1.0 if r == 0 and repeats_itself(c) else 0.0 for c, r in zip(completions, right)]


def score_completions(funcs: list[RewardFunc], names: list[str], completions: list[str],
                      columns: dict[str, list]) -> list[list[float]]:
    """(n_completions, n_funcs) rewards, ``nan`` where a reward does not apply; checks what each function returns."""
    table = []
    for fn, name in zip(funcs, names):
        values = fn(completions, **columns)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"reward {name!r} returned {got} values for {len(completions)} completions")
        try:
            table.append([float("nan") if v is None else float(v) for v in values])
        except (TypeError, ValueError):
            raise ValueError(f"reward {name!r} must return numbers or None, got {list(values)[:4]!r}") from None
    rows = [list(r) for r in zip(*table)]
    for i, r in enumerate(rows):
        if all(v != v for v in r):  # nan
            raise ValueError(f"no reward applies to completion {i} (record {columns['id'][i]!r}): every reward "
                             f"({', '.join(names)}) returned None")
    return rows
