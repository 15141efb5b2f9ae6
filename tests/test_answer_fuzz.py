"""Differential fuzz of answer extraction: vlatent.scoring against restatements of the official functions, on
generated responses (random option sets, distractor letters, option texts inside other words, punctuation at the
edges, markdown, refusals). The fixed tables in test_scoring.py stay; this keeps the two from drifting apart on
inputs nobody wrote by hand.

The restatements below follow the official code line by line:
- MMMU: ``parse_multi_choice_response`` of MMMU-Benchmark/MMMU@bb0b95a945998d91dfef37e969e07d49d1139438
  ``mmmu/utils/eval_utils.py:10-62`` (``random.choice`` drawn from a seeded ``random.Random`` here).
- MMStar: ``can_infer_option`` / ``can_infer_text`` / ``can_infer`` of
  open-compass/VLMEvalKit@18fc37a5337e31eec9c104887728ad14e82a6a85 ``vlmeval/utils/matching_util.py:8-49, 97-115``
  (the revision vlatent mirrors; ``VERBOSE`` unset), with ``extract_answer_from_item``'s "Z" when it fails
  (``vlmeval/dataset/utils/multiple_choice.py`` @895762d3).
"""

import random
import string
from collections import Counter

import numpy as np

from vlatent.scoring import mmstar
from vlatent.scoring.mmmu import parse_multi_choice_response

N = 3000


def official_mmmu(response, all_choices, index2ans, rng):
    """MMMU eval_utils.py:10-62; returns (letter, drawn at random)."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    index_ans, ans_with_brack, candidates = True, False, []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if len(candidates) == 0:
        for choice in all_choices:
            if f" {choice} " in response:
                candidates.append(choice)
    if len(candidates) == 0 and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if len(candidates) == 0:
        return rng.choice(all_choices), True
    if len(candidates) > 1:
        if index_ans:
            mention = "({})" if ans_with_brack else " {} "
            start_indexes = [response.rfind(mention.format(can)) for can in candidates]
        else:
            start_indexes = [response.lower().rfind(index2ans[can].lower()) for can in candidates]
        return candidates[np.argmax(start_indexes)], False
    return candidates[0], False


def official_can_infer(answer, choices):
    """VLMEvalKit matching_util.py:8-49 (can_infer_option), 97-115 (can_infer_text, can_infer)."""
    answer = str(answer)

    def option():
        if "Failed to obtain answer via API" in answer:
            return False
        for err in ["Sorry, I can't help with images of people yet.", "I can't process this file.",
                    "I'm sorry, but without the image provided", "Cannot determine the answer"]:
            if err in answer:
                return "Z"
        answer_mod = answer
        for c in ".()[],:;!*#{}":
            answer_mod = answer_mod.replace(c, " ")
        splits = [x.strip() for x in answer_mod.split()]
        count = sum(c in splits for c in choices)
        if count == 1:
            for ch in choices:
                if ch in splits:
                    return ch
        elif count == 0 and sum(c in splits for c in {"Z", ""}) == 1:
            return "Z"
        return False

    def text():
        lowered = answer.lower()
        cands = [k for k in choices if str(choices[k]).lower() in lowered]
        return cands[0] if len(cands) == 1 else False

    return option() or text()


WORDS = ["cat", "category", "red", "blue", "dog", "a", "A", "I", "it", "left", "up", "3", "3.0", "30", "Z", "z",
         "answer", "option", "the", "is", "Apple", "B12", "box", "none of the above", "two cats"]
EDGES = ["", "", ".", ",", "!", "?", ";", ":", "'", "..", "'.", " ", "\n", "**", ")", "("]


def random_case(rng):
    """A random option set and a response made of option mentions, distractors and punctuation."""
    n = rng.randint(2, 9)
    letters = string.ascii_uppercase[:n]
    options = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n)]
    pieces = []
    for _ in range(rng.randint(0, 7)):
        kind = rng.random()
        letter = rng.choice(letters + "XYZa")
        if kind < 0.15:
            pieces.append(f"({letter})")
        elif kind < 0.3:
            pieces.append(letter)
        elif kind < 0.4:
            pieces.append(rng.choice(["The answer is {}.", "**{}**", "\\boxed{{{}}}", "[{}]", "{}:", "Option {},"])
                          .format(letter))
        elif kind < 0.55:
            pieces.append(rng.choice(options))
        elif kind < 0.6:
            pieces.append(rng.choice(["Cannot determine the answer", "Failed to obtain answer via API", "Z"]))
        else:
            pieces.append(rng.choice(WORDS))
    sep = rng.choice([" ", " ", "", ", ", "\n"])
    response = rng.choice(EDGES) + sep.join(pieces) + rng.choice(EDGES)
    return options, response


def test_mmmu_multiple_choice_matches_the_official_parser():
    rng, methods = random.Random(0), Counter()
    for i in range(N):
        options, response = random_case(rng)
        letters = list(string.ascii_uppercase[: len(options)])
        want, drawn = official_mmmu(response, letters, dict(zip(letters, options)), random.Random(i))
        got = parse_multi_choice_response(response, options, random.Random(i))
        assert (got.answer, got.fallback) == (want, drawn), (response, options, got)
        methods[got.method] += 1
    assert min(methods[m] for m in ("bracket", "letter", "text", "random")) >= 50, methods  # every rule exercised


def test_mmstar_matches_vlmevalkit_can_infer():
    rng, methods = random.Random(1), Counter()
    for _ in range(N):
        options, response = random_case(rng)
        want = official_can_infer(response, dict(zip(string.ascii_uppercase, options))) or "Z"
        got = mmstar.parse(response, options)
        assert got.answer == want, (response, options, got)
        methods[got.method] += 1
    assert min(methods[m] for m in ("option", "rejected", "text", "failed")) >= 50, methods
