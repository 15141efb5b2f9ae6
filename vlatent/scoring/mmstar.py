"""MMStar scoring with VLMEvalKit's exact-matching judgements (no LLM judge), plus MMStar's MG / ML.

Mirrors ``open-compass/VLMEvalKit``: ``vlmeval/utils/matching_util.py`` @18fc37a5 (``can_infer_option``,
``can_infer_text``, ``can_infer``) and ``vlmeval/dataset/utils/multiple_choice.py`` @895762d3
(``build_choices``, ``extract_answer_from_item`` with ``model=None``, ``eval_vanilla``, ``report_acc``), as run
by ``ImageMCQDataset.evaluate`` (``vlmeval/dataset/image_mcq.py``) for MMStar, which is not circular. Some
later revisions only accept a letter among the last words of the answer and skip text matching for long
answers; those are not mirrored (see ``can_infer_option``). Multi-modal gain and leakage follow the MMStar paper
(arXiv 2403.20330): ``MG = S_v - S_wv`` and ``ML = max(0, S_wv - S_t)``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

from .common import ParsedAnswer, option_letters, unwrap_boxed

# can_infer_option: an answer containing one of these is a refusal, read as option "Z" (never a gold letter)
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = str.maketrans(".()[],:;!*#{}", " " * 13)  # turned into spaces before splitting into words


def build_choices(options: Sequence[str | None]) -> dict[str, str]:
    """``build_choices``: letter -> option text for A, B, ...; missing (``None``) options are left out but keep
    their letter's place, as VLMEvalKit skips NaN option columns."""
    return {letter: str(text) for letter, text in zip(option_letters(options), options) if text is not None}


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """``can_infer_option``: the letter, when exactly one option letter appears as a whole word.

    API-failure text -> nothing; a known refusal -> ``"Z"``. Otherwise ``.()[],:;!*#{}`` become spaces, the
    answer is split on whitespace, and the (case-sensitive) option letters among the words are counted:
    exactly one -> that letter ("The answer is C.", "(B)", "**A**", ``\\boxed{D}``, and also "A cat ...");
    none but a word ``Z`` -> ``"Z"``; otherwise (several letters, or none) nothing. The official
    "A might be a quantifier" check only runs with the ``VERBOSE`` environment variable set; it is off here,
    as in a default run. (Revisions of VLMEvalKit that also require the letter to be among the last 4 words,
    and ``can_infer_text``'s length guard, are not mirrored.)
    """
    if _API_FAILURE in answer:
        return None
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    words = answer.translate(_SEPARATORS).split()
    present = [letter for letter in choices if letter in words]
    if len(present) == 1:
        return present[0]
    if not present and "Z" in words:
        return "Z"
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """``can_infer_text``: the letter whose option text (lower-cased) is a substring of the lower-cased answer,
    when exactly one option text is; nothing when none or several are (e.g. "cat" inside "category")."""
    lowered = answer.lower()
    hits = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """``can_infer``: ``can_infer_option``, else ``can_infer_text``."""
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def parse(response: str, options: Sequence[str | None] | None, *, unwrap: bool = False) -> ParsedAnswer:
    """``extract_answer_from_item`` under the ``exact_matching`` policy: ``can_infer`` on the prediction, and
    ``"Z"`` (counted wrong) when it fails. ``method``: ``option``, ``rejected`` (a ``"Z"`` from
    ``can_infer_option``), ``text`` or ``failed``. Never random, so ``fallback`` is always False."""
    if options is None:
        raise ValueError("MMStar parsing needs the options")
    response = "" if response is None else str(response)
    if unwrap:
        response = unwrap_boxed(response)
    choices = build_choices(options)
    option = can_infer_option(response, choices)
    if option:
        return ParsedAnswer(option, False, "rejected" if option == "Z" else "option")
    text = can_infer_text(response, choices)
    if text:
        return ParsedAnswer(text, False, "text")
    return ParsedAnswer("Z", False, "failed")


def judge(parsed: ParsedAnswer, gold: str) -> bool:
    """``eval_vanilla``: a hit when the extracted option equals the gold letter."""
    return parsed.answer == gold


# --------------------------------------------------------------------------------------------------
# Aggregation: report_acc, and the MMStar paper's MG / ML


def _l2_category(row: Mapping[str, object]) -> object:
    return row.get("l2_category", row.get("l2-category"))


def _group(rows: Sequence[Mapping[str, object]], key) -> dict[str, dict]:
    groups: dict[str, list[Mapping[str, object]]] = {}
    for row in rows:
        name = key(row)
        if name is not None:
            groups.setdefault(str(name), []).append(row)
    return {name: _accuracy(groups[name]) for name in sorted(groups)}  # report_acc sorts the groups


def _accuracy(rows: Sequence[Mapping[str, object]]) -> dict:
    correct = sum(bool(row["correct"]) for row in rows)
    failed = sum(bool(row.get("failed", False)) for row in rows)
    return {"acc": correct / len(rows) if rows else 0.0, "num": len(rows), "correct": correct, "failed": failed}


def mmstar_scores(rows: Iterable[Mapping[str, object]]) -> dict:
    """``report_acc`` for MMStar: the mean hit overall, per ``category`` and per ``l2_category``.

    ``rows``: dicts with ``correct``, ``category``, ``l2_category`` (``l2-category`` also read) and optionally
    ``failed`` (nothing could be extracted). Returns ``{"overall", "num", "correct", "failed", "per_category",
    "per_l2_category"}``, each group ``{"acc", "num", "correct", "failed"}``, groups sorted by name as
    ``report_acc`` sorts them. Accuracies are fractions.
    """
    rows = list(rows)
    overall = _accuracy(rows)
    return {
        "overall": overall["acc"],
        "num": overall["num"],
        "correct": overall["correct"],
        "failed": overall["failed"],
        "per_category": _group(rows, lambda row: row.get("category")),
        "per_l2_category": _group(rows, _l2_category),
    }


ScoreLike = Union[float, Mapping[str, object], Sequence[Mapping[str, object]]]


def _overall_and_categories(score: ScoreLike) -> tuple[float, dict[str, float] | None]:
    """A score given as a number, as ``mmstar_scores``' result, or as the result rows themselves."""
    if isinstance(score, (int, float)):
        return float(score), None
    if isinstance(score, Mapping):
        groups = score.get("per_category")
        per_category = {name: group["acc"] for name, group in groups.items()} if groups else None
        return float(score["overall"]), per_category
    return _overall_and_categories(mmstar_scores(score))


def mmstar_gain_leakage(with_images: ScoreLike, without_images: ScoreLike, llm_text_only: ScoreLike | None = None
                        ) -> dict:
    """Multi-modal gain and leakage as the MMStar paper defines them.

    ``with_images``: the LVLM evaluated with images (``S_v``); ``without_images``: the same LVLM with the images
    withheld (``S_wv``); ``llm_text_only``: its LLM base, text only (``S_t``). ``MG = S_v - S_wv``;
    ``ML = max(0, S_wv - S_t)``, ``None`` when ``S_t`` is not given. Each score is a number, a
    ``mmstar_scores`` result or the result rows; the result is in the same unit (fractions unless you pass
    percentages). When categories are known for the runs, ``per_category`` has the same for each category
    present in both LVLM runs (ML only where the text-only run has that category too).
    """
    s_v, cat_v = _overall_and_categories(with_images)
    s_wv, cat_wv = _overall_and_categories(without_images)
    s_t, cat_t = _overall_and_categories(llm_text_only) if llm_text_only is not None else (None, None)
    result: dict = {
        "s_v": s_v, "s_wv": s_wv, "s_t": s_t,
        "mg": s_v - s_wv,
        "ml": max(0.0, s_wv - s_t) if s_t is not None else None,
    }
    if cat_v and cat_wv:
        result["per_category"] = {
            name: {
                "mg": cat_v[name] - cat_wv[name],
                "ml": max(0.0, cat_wv[name] - cat_t[name]) if cat_t and name in cat_t else None,
            }
            for name in cat_v if name in cat_wv
        }
    return result
