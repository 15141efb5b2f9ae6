"""MMMU scoring with the judgements of the official MMMU evaluation code.

Mirrors ``MMMU-Benchmark/MMMU`` ``eval/eval_utils.py`` (read at commits 44b45b50 and bb91f232, which
agree), ``eval/data_utils.py`` (``DOMAIN_CAT2SUB_CAT``, ``CAT_SHORT2LONG``) and ``eval/main_eval_only.py`` /
``eval/print_results.py`` (the subject taken from the id, ``calculate_ins_level_acc``). Each function names
the official one it follows; the quirks (for instance a trailing newline hides a bare letter) are kept on
purpose so that the same model outputs get the same scores as the leaderboard.
"""

from __future__ import annotations

import random
import re
from typing import Iterable, Mapping, Sequence, Union

from .common import ParsedAnswer, option_letters, unwrap_boxed

Gold = Union[str, Sequence[str]]
Prediction = Union[str, float]

DEFAULT_SEED = 42  # the official module calls random.seed(42) at import

# --------------------------------------------------------------------------------------------------
# Multiple choice: parse_multi_choice_response, eval_multi_choice

_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'")  # stripped from both ends, one character at a time


def parse_multi_choice_response(response: str, options: Sequence[str], rng: random.Random) -> ParsedAnswer:
    """The letter MMMU's ``parse_multi_choice_response`` picks from ``response``.

    1. Strip each of ``, . ! ? ; : '`` from both ends, in that order (no whitespace strip), then pad the
       response with one space on each side.
    2. Candidates are the letters written ``(A)``; if none, the letters standing alone between spaces
       (`` A ``); if none and the padded response has more than 5 whitespace-separated words, the options
       whose text occurs in it (case-insensitive).
    3. One candidate: that one. Several: the one whose mention starts last (``rfind`` of ``(X)``, `` X `` or
       the option text; the first candidate wins ties, as ``np.argmax`` does). None: a random letter from
       ``rng`` (``fallback=True``).
    """
    letters = option_letters(options)
    if not letters:
        raise ValueError("a multiple-choice question needs at least one option")
    text = response
    for char in _EDGE_PUNCTUATION:
        text = text.strip(char)
    padded = f" {text} "

    def last(candidates: list[str], mention: Mapping[str, str], haystack: str, method: str) -> ParsedAnswer:
        best = max(candidates, key=lambda letter: haystack.rfind(mention[letter]))  # first max wins ties
        return ParsedAnswer(best, False, method)

    bracketed = {letter: f"({letter})" for letter in letters}
    found = [letter for letter in letters if bracketed[letter] in padded]
    if found:
        return last(found, bracketed, padded, "bracket")

    spaced = {letter: f" {letter} " for letter in letters}
    found = [letter for letter in letters if spaced[letter] in padded]
    if found:
        return last(found, spaced, padded, "letter")

    if len(padded.split()) > 5:
        lowered = padded.lower()
        texts = {letter: str(option).lower() for letter, option in zip(letters, options)}
        found = [letter for letter in letters if texts[letter] in lowered]
        if found:
            return last(found, texts, lowered, "text")

    return ParsedAnswer(rng.choice(letters), True, "random")


def eval_multi_choice(gold: Gold, pred: str) -> bool:
    """``eval_multi_choice``: exact equality with the gold letter, or with any of a list of gold letters."""
    if isinstance(gold, str):
        return gold == pred
    return any(answer == pred for answer in gold)


# --------------------------------------------------------------------------------------------------
# Open questions: check_is_number, normalize_str, extract_numbers, parse_open_response, eval_open


def check_is_number(string: str) -> bool:
    """``check_is_number``: ``float()`` accepts it once commas are removed (so ``1e3``, ``inf``, ``nan`` too)."""
    try:
        float(string.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(string: str) -> list[Prediction]:
    """``normalize_str``: a number becomes ``[round(float, 2)]`` (so ``3``, ``3.0`` and ``3.001`` agree);
    other text is lower-cased, and a single character becomes ``[" x", "x "]`` to avoid trivial matches."""
    string = string.strip()
    if check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(string: str) -> list[str]:
    """``extract_numbers``: comma-grouped numbers, then scientific notation, then plain numbers (the
    patterns overlap: ``1,234`` also yields ``234`` as a plain number, as in the official code)."""
    found: list[str] = []
    for pattern in (_NUMBER_WITH_COMMAS, _NUMBER_SCIENTIFIC, _NUMBER_SIMPLE):
        found.extend(pattern.findall(string))
    return found


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_KEYS = frozenset({":", ",", ".", "!", "?", ";", "'"})


def _key_subresponses(response: str) -> list[str]:
    """``get_key_subresponses`` inside ``parse_open_response``.

    The response is stripped, stripped of ``.`` and lower-cased, then split into sub-responses. The official
    split pattern is ``\\.\\s(?=[A-Z])|\\n`` applied *after* lower-casing, so only newlines ever split.
    In each sub-response the shortest tail after any indicator (``is ``, ``so ``, ...; ``=`` too in the last
    sub-response) is a key response unless it is a lone punctuation mark. An empty tail counts as "none yet",
    so a later, longer tail replaces it (official ``if not shortest_key_response``). No key response at all:
    the whole normalised response.
    """
    text = response.strip().strip(".").lower()
    parts = text.split("\n")
    keys: list[str] = []
    for index, part in enumerate(parts):
        indicators = _KEY_INDICATORS + ("=",) if index == len(parts) - 1 else _KEY_INDICATORS
        shortest: str | None = None
        for indicator in indicators:
            if indicator in part:
                tail = part.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest not in _TRIVIAL_KEYS:
            keys.append(shortest)
    return keys or [text]


def parse_open_response(response: str) -> tuple[Prediction, ...]:
    """``parse_open_response``: the key responses plus every number extracted from them, each passed through
    ``normalize_str``, without duplicates (the official code returns a ``set``'s list; order never matters
    to ``eval_open``, so it is kept here for readability)."""
    keys = _key_subresponses(response)
    raw = list(keys)
    for key in keys:
        raw.extend(extract_numbers(key))
    preds: list[Prediction] = []
    for item in raw:
        preds.extend(normalize_str(item))
    return tuple(dict.fromkeys(preds))


def eval_open(gold: Gold, preds: Iterable[Prediction]) -> bool:
    """``eval_open``: correct when a string prediction contains a normalised string gold, or a number
    prediction equals a normalised number gold (both rounded to 2 decimals)."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm_golds = [norm for answer in golds for norm in normalize_str(answer)]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(norm, str) and norm in pred for norm in norm_golds):
                return True
        elif pred in norm_golds:
            return True
    return False


# --------------------------------------------------------------------------------------------------
# One response


def parse(
    response: str,
    options: Sequence[str] | None = None,
    question_type: str = "multiple-choice",
    *,
    seed: int = DEFAULT_SEED,
    rng: random.Random | None = None,
    unwrap: bool = False,
) -> ParsedAnswer:
    """Parse one MMMU response. ``rng`` (if given) draws the random fallback, else ``random.Random(seed)``;
    pass one shared ``random.Random(42)`` over a whole run, in the official order, to reproduce the official
    fallback stream. ``unwrap``: opt-in ``\\boxed{}`` unwrapping (not official)."""
    response = "" if response is None else response
    if unwrap:
        response = unwrap_boxed(response)
    if question_type == "multiple-choice":
        if options is None:
            raise ValueError("MMMU multiple-choice parsing needs the options")
        return parse_multi_choice_response(response, options, rng if rng is not None else random.Random(seed))
    if question_type == "open":
        return ParsedAnswer(parse_open_response(response), False, "open")
    raise ValueError(f"unknown MMMU question_type {question_type!r}; expected 'multiple-choice' or 'open'")


def judge(parsed: ParsedAnswer, gold: Gold) -> bool:
    """``evaluate``'s per-sample rule on an already parsed answer: ``eval_multi_choice`` for a letter,
    ``eval_open`` for an open question's prediction tuple."""
    if isinstance(parsed.answer, str):
        return eval_multi_choice(gold, parsed.answer)
    return eval_open(gold, parsed.answer)


# --------------------------------------------------------------------------------------------------
# Aggregation: data_utils.CAT_SHORT2LONG / DOMAIN_CAT2SUB_CAT, calculate_ins_level_acc

SUBJECTS: dict[str, str] = {  # CAT_SHORT2LONG, in its (official, reporting) order
    "acc": "Accounting", "agri": "Agriculture", "arch": "Architecture_and_Engineering", "art": "Art",
    "art_theory": "Art_Theory", "bas_med": "Basic_Medical_Science", "bio": "Biology", "chem": "Chemistry",
    "cli_med": "Clinical_Medicine", "cs": "Computer_Science", "design": "Design",
    "diag_med": "Diagnostics_and_Laboratory_Medicine", "econ": "Economics", "elec": "Electronics",
    "ep": "Energy_and_Power", "fin": "Finance", "geo": "Geography", "his": "History", "liter": "Literature",
    "manage": "Manage", "mark": "Marketing", "mate": "Materials", "math": "Math",
    "mech": "Mechanical_Engineering", "music": "Music", "phar": "Pharmacy", "phys": "Physics",
    "psy": "Psychology", "pub_health": "Public_Health", "socio": "Sociology",
}

DISCIPLINES: dict[str, tuple[str, ...]] = {  # DOMAIN_CAT2SUB_CAT, official names and order
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}

SUBJECT_TO_DISCIPLINE = {subject: domain for domain, subjects in DISCIPLINES.items() for subject in subjects}


def subject_of(row: Mapping[str, object]) -> str:
    """The subject of a result row: its ``subject`` (long name or ``CAT_SHORT2LONG`` short code), else derived
    from its ``id`` as ``main_eval_only.py`` does (``validation_Art_Theory_1`` -> ``Art_Theory``)."""
    subject = row.get("subject")
    if subject:
        subject = SUBJECTS.get(str(subject), str(subject))
    elif "id" in row:
        subject = "_".join(str(row["id"]).split("_")[1:-1])
    else:
        raise ValueError(f"MMMU row needs an 'id' or a 'subject': {dict(row)!r}")
    if subject not in SUBJECT_TO_DISCIPLINE:
        raise ValueError(f"unknown MMMU subject {subject!r} (row {dict(row)!r})")
    return subject


def _ins_level_acc(groups: Iterable[Mapping[str, float]]) -> float:
    """``calculate_ins_level_acc``: sum of ``acc * num`` over groups divided by the total ``num`` (0 if none)."""
    weighted = 0.0
    total = 0
    for group in groups:
        weighted += group["acc"] * group["num"]
        total += int(group["num"])
    return weighted / total if total else 0.0


def mmmu_scores(rows: Iterable[Mapping[str, object]]) -> dict:
    """Accuracy per subject, per discipline and overall, weighted as the official ``calculate_ins_level_acc``.

    ``rows``: dicts with ``id`` (or ``subject``), ``correct`` and optionally ``fallback`` (the random choice
    was used). Returns ``{"overall", "num", "correct", "fallbacks", "per_subject", "per_discipline"}`` where
    each per-group entry is ``{"acc", "num", "correct", "fallbacks"}``. Subjects are listed in the official
    ``CAT_SHORT2LONG`` order and disciplines in ``DOMAIN_CAT2SUB_CAT`` order, only those present. Accuracies
    are fractions, unrounded (the official table rounds to 3 decimals).
    """
    tally: dict[str, list[int]] = {}
    for row in rows:
        counts = tally.setdefault(subject_of(row), [0, 0, 0])
        counts[0] += 1
        counts[1] += bool(row["correct"])
        counts[2] += bool(row.get("fallback", False))

    def entry(acc: float, num: int, correct: int, fallbacks: int) -> dict:
        return {"acc": acc, "num": num, "correct": correct, "fallbacks": fallbacks}

    per_subject = {
        subject: entry(tally[subject][1] / tally[subject][0], *tally[subject])
        for subject in SUBJECTS.values() if subject in tally
    }
    per_discipline = {}
    for domain, subjects in DISCIPLINES.items():
        present = [per_subject[s] for s in subjects if s in per_subject]
        if present:
            per_discipline[domain] = entry(
                _ins_level_acc(present), *(sum(group[key] for group in present)
                                           for key in ("num", "correct", "fallbacks")))
    return {
        "overall": _ins_level_acc(per_subject.values()),
        "num": sum(group["num"] for group in per_subject.values()),
        "correct": sum(group["correct"] for group in per_subject.values()),
        "fallbacks": sum(group["fallbacks"] for group in per_subject.values()),
        "per_subject": per_subject,
        "per_discipline": per_discipline,
    }
