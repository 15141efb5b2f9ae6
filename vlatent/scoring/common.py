"""Shared pieces of the scorers: the parse result and the opt-in ``\\boxed{}`` pre-normalisation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

# A parsed answer: an option letter (multiple choice) or the normalised prediction list of an MMMU open
# question (strings and floats, see ``mmmu.parse_open_response``).
Answer = Union[str, tuple[Union[str, float], ...]]


@dataclass(frozen=True)
class ParsedAnswer:
    """What a parser made of one response.

    ``answer``: the option letter, ``"Z"`` where VLMEvalKit gives up, or for MMMU open questions the tuple of
    normalised predictions. ``fallback``: MMMU's random choice was used (nothing parsed), so reports can
    count it. ``method``: which rule decided (``bracket``, ``letter``, ``text``, ``random`` for MMMU
    multiple choice; ``open`` for MMMU open; ``option``, ``text``, ``failed`` for MMStar).
    """

    answer: Answer
    fallback: bool
    method: str


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def unwrap_boxed(response: str) -> str:
    """Replace every ``\\boxed{X}`` (no nested braces) by ``X``.

    Not an official rule: neither MMMU's ``parse_multi_choice_response`` nor VLMEvalKit's ``can_infer`` knows
    ``\\boxed``. MMMU then sees ``\\boxed{C}`` as no letter at all (random fallback); VLMEvalKit already finds
    the ``C`` because it turns ``{`` and ``}`` into spaces. Used only when a caller passes
    ``unwrap_boxed=True``, and scores produced that way are not leaderboard-comparable.
    """
    return _BOXED.sub(r"\1", response)


def option_letters(options: Sequence[object]) -> list[str]:
    """``A``, ``B``, ... for the given options, as MMMU's ``get_multi_choice_info`` numbers them."""
    if len(options) > 26:
        raise ValueError(f"at most 26 options are supported, got {len(options)}")
    return [chr(ord("A") + i) for i in range(len(options))]
