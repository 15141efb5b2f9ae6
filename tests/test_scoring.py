"""vlatent.scoring: every expected value below is what the official code returns for that input, reasoned
from MMMU-Benchmark/MMMU eval/eval_utils.py and VLMEvalKit vlmeval/utils/matching_util.py +
vlmeval/dataset/utils/multiple_choice.py (the reason is in the comment next to each case)."""

import random

import pytest

from vlatent.scoring import (
    ParsedAnswer,
    judge,
    mmmu_scores,
    mmstar_gain_leakage,
    mmstar_scores,
    parse,
    unwrap_boxed,
)
from vlatent.scoring.mmmu import extract_numbers, normalize_str, parse_open_response

ANIMALS = ["cat", "dog", "bird", "fish"]
NUMBERS = ["1", "2", "3", "4"]
NESTED = ["cat", "category", "dog", "fish"]
FIVE = ["cat", "dog", "bird", "fish", "cow"]

# ---------------------------------------------------------------------------------------------------------
# MMMU multiple choice: parse_multi_choice_response + eval_multi_choice
# (response, options, expected letter, expected method)

MMMU_MC = [
    ("A", ANIMALS, "A", "letter"),  # " A " found
    ("B.", ANIMALS, "B", "letter"),  # trailing '.' stripped
    ("(C)", ANIMALS, "C", "bracket"),
    ("The answer is (D).", ANIMALS, "D", "bracket"),
    ("The answer is C", ANIMALS, "C", "letter"),
    ("Answer: B", ANIMALS, "B", "letter"),  # ':' only stripped at the ends; " B " found
    ("(A) or (B)", ANIMALS, "B", "bracket"),  # several: the last (A)/(B) by rfind
    ("(B) is wrong, (A) is right", ANIMALS, "A", "bracket"),
    ("A and B", ANIMALS, "B", "letter"),  # several bare letters: the last
    ("B or A", ANIMALS, "A", "letter"),
    ("(B) rather than A", ANIMALS, "B", "bracket"),  # brackets win over bare letters, even later ones
    ("A (C)", ANIMALS, "C", "bracket"),
    ("It's A.", ANIMALS, "A", "letter"),
    ("A:", ANIMALS, "A", "letter"),  # ':' stripped
    ("B!.", ANIMALS, "B", "letter"),  # '.' stripped before '!', both go
    ("'C'", ANIMALS, "C", "letter"),  # "'" stripped at both ends
    ("  C  ", ANIMALS, "C", "letter"),  # spaces kept, " C " still found
    ("C .", ANIMALS, "C", "letter"),  # '.' stripped, then " C  "
    (",A,", ANIMALS, "A", "letter"),
    ("?C?", ANIMALS, "C", "letter"),
    ("A B C D", ANIMALS, "D", "letter"),  # all four: the last
    ("A, B", ANIMALS, "B", "letter"),  # "A," is not " A "
    ("(A)(B)", ANIMALS, "B", "bracket"),
    ("Options (A) cat and (D) fish; I pick (B)", ANIMALS, "B", "bracket"),
    ("Between A and B, I choose A", ANIMALS, "A", "letter"),  # "B," never matches; A is last
    ("Between (A) and (B), I choose (A)", ANIMALS, "A", "bracket"),
    ("Both A and C are plausible, but C", ANIMALS, "C", "letter"),
    ("Option B is correct!", ANIMALS, "B", "letter"),
    ("This is option D for sure", ANIMALS, "D", "letter"),
    ("D is the answer because it has (a) feature", ANIMALS, "D", "letter"),  # "(a)" is not "(A)"
    ("Explanation: the animal barks, so it must be B", ANIMALS, "B", "letter"),
    ("A dog is shown in this picture", ANIMALS, "A", "letter"),  # the article counts as letter A
    ("(A) cat ... actually I would say the dog", ANIMALS, "A", "bracket"),
    ("The correct option is B.", ANIMALS, "B", "letter"),
    ("E", FIVE, "E", "letter"),
    # option-text matching: only without any letter and with more than 5 words
    ("I think the right animal here is the dog", ANIMALS, "B", "text"),
    ("The animal in the picture is a bird", ANIMALS, "C", "text"),
    ("The animal in the picture is a BIRD", ANIMALS, "C", "text"),  # case-insensitive
    ("It is a dog, not a cat at all", ANIMALS, "A", "text"),  # several texts: the last mention (cat)
    ("fish or bird? definitely the fish one here", ANIMALS, "D", "text"),
    ("The answer is B, because the dog barks", ANIMALS, "B", "text"),  # "B," no letter; text "dog"
    ("The answer is C, because the dog barks", ANIMALS, "B", "text"),  # same: the letter is lost
    ("the correct category for this one is unknown", NESTED, "A", "text"),  # cat & category tie: first
    ("The value is 3 units here", NUMBERS, "C", "text"),
    ("The value is 12 units or so", NUMBERS, "B", "text"),  # "1" and "2" both match; "2" starts last
]


@pytest.mark.parametrize("response,options,letter,method", MMMU_MC)
def test_mmmu_multiple_choice(response, options, letter, method):
    parsed = parse("mmmu", response, options)
    assert parsed == ParsedAnswer(letter, False, method)
    assert judge("mmmu", response, letter, options) is True
    wrong = "A" if letter != "A" else "B"
    assert judge("mmmu", response, wrong, options) is False


# Nothing parses -> the official random.choice; reported as a fallback.
MMMU_FALLBACK = [
    ("", ANIMALS),  # empty response
    ("A)", ANIMALS),  # neither "(A)" nor " A "
    ("B.!", ANIMALS),  # '!' stripped after '.', leaves "B."
    ('"C"', ANIMALS),  # double quotes are not stripped
    ("C\n", ANIMALS),  # newline is not a space: " C\n "
    ("B\n\nExplanation: the dog", ANIMALS),  # letter hidden by the newline; only 4 words, no text match
    ("a", ANIMALS),  # letters are case-sensitive
    ("Answer: (b)", ANIMALS),
    ("\\boxed{C}", ANIMALS),  # \boxed is unknown to the official parser
    ("The final answer is \\boxed{C}.", ANIMALS),  # 5 words: not more than 5, no text matching either
    ("dog", ANIMALS),  # option text alone: too short for text matching
    ("3", NUMBERS),
    ("The answer is C, since it is obvious", ANIMALS),  # "C," is no letter; no option text
    ("F", FIVE),  # not an option letter
    ("(E)", ANIMALS),
    ("A. ", ANIMALS),  # trailing space stops the '.' strip: " A.  "
    ("The answer is **B**", ANIMALS),
]


@pytest.mark.parametrize("response,options", MMMU_FALLBACK)
def test_mmmu_random_fallback_is_flagged_and_reproducible(response, options):
    letters = [chr(ord("A") + i) for i in range(len(options))]
    parsed = parse("mmmu", response, options)
    assert parsed.fallback and parsed.method == "random"
    assert parsed.answer == random.Random(42).choice(letters)  # the first draw after random.seed(42)
    assert parse("mmmu", response, options) == parsed
    assert parse("mmmu", response, options, seed=3).answer == random.Random(3).choice(letters)
    assert judge("mmmu", response, parsed.answer, options) is True  # judged on the drawn letter, as official
    assert judge("mmmu", response, "Z", options) is False


def test_mmmu_shared_rng_reproduces_the_official_stream():
    rng = random.Random(42)
    drawn = [parse("mmmu", "", ANIMALS, rng=rng).answer for _ in range(20)]
    official = random.Random(42)
    assert drawn == [official.choice("ABCD") for _ in range(20)]
    # parsed (non-fallback) responses consume nothing from the stream
    rng, official = random.Random(42), random.Random(42)
    assert [parse("mmmu", r, ANIMALS, rng=rng).answer for r in ["", "B", ""]] == [
        official.choice("ABCD"), "B", official.choice("ABCD")]
    assert len({parse("mmmu", "", ANIMALS, seed=s).answer for s in range(30)}) > 1


def test_mmmu_boxed_unwrapping_is_opt_in():
    assert parse("mmmu", "The final answer is \\boxed{C}.", ANIMALS).fallback
    assert parse("mmmu", "The final answer is \\boxed{C}.", ANIMALS, unwrap_boxed=True) == ParsedAnswer(
        "C", False, "letter")
    assert judge("mmmu", "\\boxed{C}", "C", ANIMALS, unwrap_boxed=True)
    assert unwrap_boxed("x \\boxed{B} y \\boxed{12}") == "x B y 12"


def test_mmmu_gold_list():
    assert judge("mmmu", "B", ["A", "B"], ANIMALS)
    assert not judge("mmmu", "C", ["A", "B"], ANIMALS)


# ---------------------------------------------------------------------------------------------------------
# MMMU open questions: parse_open_response + eval_open   (response, gold, expected)

MMMU_OPEN = [
    ("3", "3", True),
    ("3.0", "3", True),  # both sides become float 3.0
    ("The answer is 3.0 cm", "3", True),  # key "3.0 cm" -> number 3.0
    ("x = 3.14159", "3.14", True),  # '=' in the last sub-response; rounded to 2 decimals
    ("3.1", "3.14", False),
    ("3.004", "3", True),
    ("3.006", "3", False),  # 3.01
    ("2.675", "2.675", True),  # both round to 2.67
    ("13", "3", False),
    ("The total is 1234", "1,234", True),  # commas removed from the gold
    ("The total is 1,234 dollars", "1234", True),  # comma-grouped number extracted
    ("12,5", "125", True),  # "12,5" is a number once the comma goes
    ("12,5", "12", False),
    ("The probability is .5", "0.5", True),
    ("so x is -4", "-4", True),  # shortest tail after an indicator: "-4"
    ("so x is -4", "4", False),
    ("The result is 2.5e3", "2500", True),  # scientific notation
    ("1e3", "1000", True),
    ("x = -2", "-2", True),
    ("x = -2", "2", False),
    ("3 and 4", "3", True),  # no indicator: whole response, every number
    ("3 and 4", "4", True),
    ("The result is x = 7", "7", True),  # shortest of "is x = 7", "x = 7", "7"
    ("The capital of France is Paris.", "Paris", True),
    ("I believe it's Paris, France", "paris", True),  # no indicator: whole response contains it
    ("PARIS", "Paris", True),
    ("The answer is a", "a", True),  # one-character answers compare as " a" / "a "
    ("The answer is b", "a", False),
    ("banana", "a", False),  # ... so a lone "a" inside a word does not count
    ("The answer is A", "A", True),
    ("The answer is five", ["5", "five"], True),
    ("5", ["5", "five"], True),
    ("3", ["3", "3.0"], True),
    ("", "3", False),  # empty response
    ("", "0", False),
    ("5 cm", "5 cm", True),  # string gold inside string prediction
    ("5", "5 cm", False),  # a number prediction never matches a string gold
    ("5 cm", "5", True),
    ("1/3", "1/3", True),
    ("1/3", "0.33", False),
    ("0.333", "0.33", True),
    ("10", "10%", False),
    ("the answer is 10%", "10%", True),
    ("category", "cat", True),  # substring match on strings
    ("Yes, it is not", "no", True),  # key "not" contains "no"
    ("Yes, it is.", "yes", True),  # "is" at the end has no trailing space: whole response
    ("\\boxed{42}", "42", True),  # the number is extracted even without unwrapping
    # sentence split: the official pattern runs after lower-casing, so only newlines split
    ("The mass is 5 kg. The volume is 2 L", "5", False),  # one sentence: the key is "2 l"
    ("The mass is 5 kg. The volume is 2 L", "2", True),
    ("The mass is 5 kg\nThe volume is 2 L", "5", True),  # newline: both sentences give a key
    ("a = 3\nso the answer follows", "3", False),  # '=' only counts in the last sub-response
    ("a = 3", "3", True),
    ("The answer is \nhello", "hello", False),  # empty tail after "is " is replaced by "is" (answer )
    ("The answer is :", "answer", True),  # trivial key ":" dropped -> whole response
]


@pytest.mark.parametrize("response,gold,expected", MMMU_OPEN)
def test_mmmu_open(response, gold, expected):
    assert judge("mmmu", response, gold, question_type="open") is expected
    parsed = parse("mmmu", response, question_type="open")
    assert parsed.method == "open" and parsed.fallback is False and isinstance(parsed.answer, tuple)


def test_mmmu_open_helpers():
    assert normalize_str(" 3 ") == [3.0]
    assert normalize_str("1,000.456") == [1000.46]
    assert normalize_str("X") == [" x", "x "]
    assert normalize_str("Paris") == ["paris"]
    # overlapping patterns, as official: "234" from "1,234" and "-3" from "5e-3" are also plain numbers
    assert extract_numbers("1,234 and 5e-3 and -7.5 and .25") == ["1,234", "5e-3", "234", "-3", "-7.5", ".25"]
    assert set(parse_open_response("The answer is 3.0 cm")) == {"3.0 cm", 3.0}
    assert set(parse_open_response("x = 3")) == {3.0}


# ---------------------------------------------------------------------------------------------------------
# MMStar: VLMEvalKit can_infer (exact matching, no judge)   (response, options, expected option, method)

NINE = [f"o{i}" for i in range(1, 10)]  # A..I: "I" is then an option letter
MISSING_B = ["cat", None, "bird", "fish"]
CAPS = ["Cat", "Dog", "Bird", "Fish"]

MMSTAR = [
    ("A", ANIMALS, "A", "option"),
    ("(B)", ANIMALS, "B", "option"),
    ("B)", ANIMALS, "B", "option"),
    ("The answer is C", ANIMALS, "C", "option"),
    ("The answer is C.", ANIMALS, "C", "option"),
    ("Answer: D", ANIMALS, "D", "option"),
    ("Answer:B", ANIMALS, "B", "option"),  # ':' becomes a space
    ("**B**", ANIMALS, "B", "option"),
    ("\\boxed{C}", ANIMALS, "C", "option"),  # '{' '}' become spaces: \boxed is handled natively
    ("$\\boxed{D}$", ANIMALS, "D", "option"),
    ("#C", ANIMALS, "C", "option"),
    ("C;", ANIMALS, "C", "option"),
    ("[D]", ANIMALS, "D", "option"),
    ("{A}", ANIMALS, "A", "option"),
    ("A A", ANIMALS, "A", "option"),  # one distinct letter
    ("A cat", ANIMALS, "A", "option"),
    ("A dog is in the picture", ANIMALS, "A", "option"),  # the article is read as option A
    ("I think the answer is B", ANIMALS, "B", "option"),  # "I" is no option with 4 choices
    ("Option C: bird", ANIMALS, "C", "option"),
    ("B. dog", ANIMALS, "B", "option"),
    ("B. cat", ANIMALS, "B", "option"),  # the letter wins over the text
    ("The correct option is B because the dog barks", ANIMALS, "B", "option"),
    ("The answer is B, the dog, not the cat", ANIMALS, "B", "option"),
    ("C\n\nBecause the bird flies.", ANIMALS, "C", "option"),
    ("The answer is D, fish", ANIMALS, "D", "option"),
    ("E", FIVE, "E", "option"),
    ("D", MISSING_B, "D", "option"),
    # option text only (no single letter)
    ("dog", ANIMALS, "B", "text"),
    ("It is a dog.", ANIMALS, "B", "text"),  # lower-case "a" is not a letter
    ("BIRD", ANIMALS, "C", "text"),  # case-insensitive
    ("The bird", ANIMALS, "C", "text"),
    ("dog dog", ANIMALS, "B", "text"),
    ("dog", CAPS, "B", "text"),
    ("cat", NESTED, "A", "text"),  # "category" is not inside "cat"
    ("3", NUMBERS, "C", "text"),
    ("The answer is 3", NUMBERS, "C", "text"),
    ("Failed to obtain answer via API. dog", ANIMALS, "B", "text"),  # API failure skips letters only
    # several letters, or nothing usable: failure, read as "Z"
    ("A or B", ANIMALS, "Z", "failed"),
    ("A, B", ANIMALS, "Z", "failed"),
    ("C and then D", ANIMALS, "Z", "failed"),
    ("A\nB", ANIMALS, "Z", "failed"),
    ("I choose (B), not (C)", ANIMALS, "Z", "failed"),
    ("(A) cat (B) dog (C) bird. Answer: C", ANIMALS, "Z", "failed"),  # 3 letters; 3 texts
    ("I think the answer is B", NINE, "Z", "failed"),  # with 9 options "I" is letter I too
    ("cat or dog", ANIMALS, "Z", "failed"),  # two option texts
    ("category", NESTED, "Z", "failed"),  # "cat" and "category" both inside
    ("fishdog", ANIMALS, "Z", "failed"),
    ("12", NUMBERS, "Z", "failed"),  # "1" and "2"
    ("a", ANIMALS, "Z", "failed"),
    ("The answer is c", ANIMALS, "Z", "failed"),  # letters are case-sensitive
    ("answer:b", ANIMALS, "Z", "failed"),
    ("", ANIMALS, "Z", "failed"),  # empty response
    ("'A'", ANIMALS, "Z", "failed"),  # quotes are not separators
    ('"B"', ANIMALS, "Z", "failed"),
    ("A/B", ANIMALS, "Z", "failed"),
    ("<A>", ANIMALS, "Z", "failed"),
    ("A-", ANIMALS, "Z", "failed"),
    ("ABCD", ANIMALS, "Z", "failed"),
    ("E", ANIMALS, "Z", "failed"),  # not an option letter
    ("B", MISSING_B, "Z", "failed"),  # option B absent (NaN column)
    ("Failed to obtain answer via API", ANIMALS, "Z", "failed"),
    # refusals and an explicit Z: option "Z", never correct
    ("Z", ANIMALS, "Z", "rejected"),
    ("Z. None of the above", ANIMALS, "Z", "rejected"),
    ("Cannot determine the answer", ANIMALS, "Z", "rejected"),
    ("Cannot determine the answer, maybe B", ANIMALS, "Z", "rejected"),  # refusal checked first
    ("I'm sorry, but without the image provided I cannot answer", ANIMALS, "Z", "rejected"),
    ("Sorry, I can't help with images of people yet.", ANIMALS, "Z", "rejected"),
    ("I can't process this file.", ANIMALS, "Z", "rejected"),
]


@pytest.mark.parametrize("response,options,letter,method", MMSTAR)
def test_mmstar(response, options, letter, method):
    parsed = parse("mmstar", response, options)
    assert parsed == ParsedAnswer(letter, False, method)
    for gold in "ABCD":
        assert judge("mmstar", response, gold, options) is (gold == letter)


def test_mmstar_boxed_unwrapping_is_opt_in_and_changes_nothing_here():
    for response in ["\\boxed{B}", "The answer is \\boxed{B}."]:
        assert parse("mmstar", response, ANIMALS) == parse("mmstar", response, ANIMALS, unwrap_boxed=True)
        assert judge("mmstar", response, "B", ANIMALS, unwrap_boxed=True)


# ---------------------------------------------------------------------------------------------------------
# Aggregation


def test_mmmu_scores_per_subject_discipline_and_instance_weighted_overall():
    rows = [
        {"id": "validation_Art_Theory_1", "correct": True, "fallback": False},
        {"id": "validation_Art_Theory_2", "correct": False, "fallback": False},
        {"id": "validation_Art_1", "correct": True},
        {"id": "validation_Math_1", "correct": True, "fallback": True},
        {"id": "validation_Math_2", "correct": False, "fallback": True},
        {"id": "validation_Math_3", "correct": False},
        {"id": "dev_Clinical_Medicine_5", "correct": True},
        {"subject": "phys", "correct": False},  # CAT_SHORT2LONG short code
    ]
    s = mmmu_scores(rows)
    assert list(s["per_subject"]) == ["Art", "Art_Theory", "Clinical_Medicine", "Math", "Physics"]  # official order
    assert s["per_subject"]["Art_Theory"] == {"acc": 0.5, "num": 2, "correct": 1, "fallbacks": 0}
    assert s["per_subject"]["Math"]["acc"] == pytest.approx(1 / 3)
    assert s["per_subject"]["Math"]["fallbacks"] == 2
    assert list(s["per_discipline"]) == ["Art and Design", "Science", "Health and Medicine"]
    assert s["per_discipline"]["Art and Design"]["acc"] == pytest.approx(2 / 3)
    assert s["per_discipline"]["Science"] == {"acc": pytest.approx(0.25), "num": 4, "correct": 1, "fallbacks": 2}
    assert s["per_discipline"]["Health and Medicine"]["acc"] == 1.0
    # instance-level (calculate_ins_level_acc), not the mean of subject accuracies (0.5667)
    assert s["overall"] == pytest.approx(0.5)
    assert (s["num"], s["correct"], s["fallbacks"]) == (8, 4, 2)


def test_mmmu_scores_subject_from_id_with_underscores_and_empty():
    s = mmmu_scores([{"id": "test_Diagnostics_and_Laboratory_Medicine_12", "correct": 1}])
    assert s["per_discipline"] == {"Health and Medicine": {"acc": 1.0, "num": 1, "correct": 1, "fallbacks": 0}}
    assert mmmu_scores([])["overall"] == 0.0


def test_mmmu_scores_rejects_unknown_subjects():
    with pytest.raises(ValueError, match="Astrology"):
        mmmu_scores([{"id": "validation_Astrology_1", "correct": True}])
    with pytest.raises(ValueError, match="'id' or a 'subject'"):
        mmmu_scores([{"correct": True}])


def test_mmmu_end_to_end_counts_fallbacks():
    items = [("validation_Math_1", "(B)", "B"), ("validation_Math_2", "", "A"), ("validation_Art_1", "C", "D")]
    rows = []
    for qid, response, gold in items:
        parsed = parse("mmmu", response, ANIMALS)
        rows.append({"id": qid, "correct": judge("mmmu", response, gold, ANIMALS), "fallback": parsed.fallback})
    s = mmmu_scores(rows)
    assert s["fallbacks"] == 1 and s["per_subject"]["Math"]["fallbacks"] == 1
    assert s["per_subject"]["Art"]["acc"] == 0.0


MMSTAR_ROWS = [
    {"correct": True, "category": "coarse perception", "l2_category": "image scene and topic"},
    {"correct": False, "category": "coarse perception", "l2_category": "image style & quality"},
    {"correct": True, "category": "math", "l2-category": "geometry"},  # VLMEvalKit's column name
    {"correct": True, "category": "math", "l2_category": "geometry", "failed": False},
    {"correct": False, "category": "math", "l2_category": "numeric commonsense and calculation", "failed": True},
]


def test_mmstar_scores():
    s = mmstar_scores(MMSTAR_ROWS)
    assert s["overall"] == pytest.approx(0.6) and (s["num"], s["correct"], s["failed"]) == (5, 3, 1)
    assert s["per_category"] == {
        "coarse perception": {"acc": 0.5, "num": 2, "correct": 1, "failed": 0},
        "math": {"acc": pytest.approx(2 / 3), "num": 3, "correct": 2, "failed": 1},
    }
    assert list(s["per_l2_category"]) == sorted(s["per_l2_category"])  # report_acc sorts
    assert s["per_l2_category"]["geometry"] == {"acc": 1.0, "num": 2, "correct": 2, "failed": 0}
    assert s["per_l2_category"]["numeric commonsense and calculation"]["acc"] == 0.0
    assert mmstar_scores([])["overall"] == 0.0


def test_mmstar_gain_and_leakage_from_numbers():
    r = mmstar_gain_leakage(0.6, 0.3, 0.35)
    assert r["mg"] == pytest.approx(0.3) and r["ml"] == 0.0  # S_wv below S_t: no leakage
    r = mmstar_gain_leakage(0.6, 0.3, 0.2)
    assert r["ml"] == pytest.approx(0.1)
    r = mmstar_gain_leakage(57.1, 36.5)  # percentages stay percentages
    assert r["mg"] == pytest.approx(20.6) and r["ml"] is None and r["s_t"] is None
    assert mmstar_gain_leakage(0.3, 0.4)["mg"] == pytest.approx(-0.1)  # MG can be negative


def test_mmstar_gain_and_leakage_from_runs():
    with_images = MMSTAR_ROWS
    without = [dict(row, correct=False) for row in MMSTAR_ROWS]
    without[2]["correct"] = True  # one math question answered without the image
    text_only = [dict(row, correct=False) for row in MMSTAR_ROWS]
    r = mmstar_gain_leakage(with_images, mmstar_scores(without), text_only)
    assert r["s_v"] == pytest.approx(0.6) and r["s_wv"] == pytest.approx(0.2) and r["s_t"] == 0.0
    assert r["mg"] == pytest.approx(0.4) and r["ml"] == pytest.approx(0.2)
    assert r["per_category"]["math"] == {"mg": pytest.approx(1 / 3), "ml": pytest.approx(1 / 3)}
    assert r["per_category"]["coarse perception"] == {"mg": 0.5, "ml": 0.0}


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_benchmark_and_question_type():
    with pytest.raises(ValueError, match="mmbench"):
        judge("mmbench", "A", "A", ANIMALS)
    with pytest.raises(ValueError, match="mmbench"):
        parse("mmbench", "A", ANIMALS)
    with pytest.raises(ValueError, match="short-answer"):
        judge("mmmu", "A", "A", ANIMALS, question_type="short-answer")
    with pytest.raises(ValueError, match="open"):
        judge("mmstar", "A", "A", ANIMALS, question_type="open")
    with pytest.raises(ValueError, match="options"):
        judge("mmmu", "A", "A")
    with pytest.raises(ValueError, match="options"):
        judge("mmstar", "A", "A")


def test_docstring_examples():
    import doctest

    import vlatent.scoring

    assert doctest.testmod(vlatent.scoring).failed == 0


def test_benchmark_name_is_case_insensitive():
    assert judge("MMStar", "A", "A", ANIMALS) and judge("MMMU", "A", "A", ANIMALS)
