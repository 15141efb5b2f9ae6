"""Monet's released RL reward as named rewards (boxed accuracy, boxed format, length penalty), on hand cases."""

import sys
from pathlib import Path

from vlatent.generation import Generation
from vlatent.training.rewards import (boxed_accuracy_reward, boxed_format_reward, last_boxed, length_penalty_reward,
                                      repeats_itself, repetition_penalty_reward, score_completions, get_reward)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the apps are not installed packages


def test_last_boxed_takes_the_last_balanced_box():
    assert last_boxed(r"first \boxed{1}, then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{ B }") == "B"
    assert last_boxed(r"no box") is None and last_boxed(r"\boxed{unclosed") is None


def test_boxed_accuracy_judges_only_the_boxed_answer():
    completions = [r"I first thought 7, but \boxed{12}", r"It is 7. \boxed{12}", "The answer is 7", r"\boxed{B}"]
    answers = ["12", "7", "7", "B"]
    options = [None, None, None, ["cat", "dog"]]
    # the boxed content decides (row 2 mentions the gold 7 outside the box: wrong); no box: the whole text
    assert boxed_accuracy_reward(completions, answers, options) == [1.0, 0.0, 1.0, 1.0]
    assert boxed_accuracy_reward(["x"], [None]) == [None]


def test_boxed_format_as_released():
    # the release's regex \\boxed\{.*?\} after removing spaces around < > /
    assert boxed_format_reward([r"so \boxed{4}", "The answer is 4", r"\boxed{4} < / observation >",
                                "boxed{4}", "\\boxed{\n4\n}"]) == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_length_penalty_counts_steps_beyond_the_reference():
    gens = [Generation(num_steps=30), Generation(num_steps=12), Generation(num_steps=50), Generation(num_steps=5)]
    meta = [{"reference_length": 20}, {"reference_length": 20}, {"reference_length": 0}, {}]
    assert length_penalty_reward(["a"] * 4, generations=gens, meta=meta) == [-10.0, 0.0, None, None]


def test_monet_weights_combine_as_released():
    """0.9 x accuracy + 0.1 x format - 0.001 x penalty, by the recipe's weights over score_completions' table."""
    names = ["boxed_accuracy", "boxed_format", "length_penalty"]
    weights = [0.9, 0.1, 0.001]
    completions = [r"\boxed{3}", "3", r"\boxed{4}"]
    columns = {"answer": ["3", "3", "3"], "options": [None] * 3, "question_type": [None] * 3, "id": ["a", "b", "c"],
               "generations": [Generation(num_steps=n) for n in (120, 80, 100)],
               "meta": [{"reference_length": 100}] * 3}
    table = score_completions([get_reward(n) for n in names], names, completions, columns)
    total = [sum(w * v for w, v in zip(weights, row)) for row in table]
    expected = [0.9 + 0.1 - 0.001 * 20, 0.9, 0.1]
    assert all(abs(t - e) < 1e-9 for t, e in zip(total, expected)), total


def test_monet_recipe_uses_the_released_reward():
    from train.vlpo import check_recipe
    from vlatent.training import load_recipe

    config = check_recipe(load_recipe(ROOT / "train" / "recipes" / "vlpo_monet.yaml"))
    assert config.reward_funcs == ["boxed_accuracy", "boxed_format", "length_penalty", "repetition_penalty"]
    assert config.reward_weights == [0.9, 0.1, 0.001, 0.9] and config.top_p == 0.99 and not config.latent_exploration
    assert config.difficulty_filter and config.difficulty_threshold == 0.6
    assert config.difficulty_reward == "boxed_accuracy"


def test_repeats_itself_counts_sentences_of_three_words():
    loop = "The pattern in the bottom row is  increasing. "
    assert repeats_itself(loop * 3) and not repeats_itself(loop * 2)
    assert repeats_itself("So it is B.\nso  IT is b! So it is B?")  # case, spaces and end marks ignored
    assert not repeats_itself("Yes. Yes. Yes. Yes.")  # sentences under 3 words do not count


def test_repetition_penalty_hits_only_wrong_repetitive_answers():
    loop = "The row grows by one. " * 3
    completions = [loop + r"\boxed{B}", loop + r"\boxed{A}", r"It grows. \boxed{B}", "x"]
    assert repetition_penalty_reward(completions, ["A", "A", "A", None]) == [-1.0, 0.0, 0.0, None]


def test_repetition_penalty_weighted_as_released():
    """A wrong, repetitive boxed answer: the release's accuracy -1 -> 0.9 x -1 + 0.1 x 1 = -0.8."""
    names = ["boxed_accuracy", "boxed_format", "length_penalty", "repetition_penalty"]
    weights = [0.9, 0.1, 0.001, 0.9]
    completions = ["It is one. " * 3 + r"\boxed{1}", "It is one. " * 3 + r"\boxed{3}", r"\boxed{1}"]
    columns = {"answer": ["3"] * 3, "options": [None] * 3, "question_type": [None] * 3, "id": ["a", "b", "c"],
               "generations": [Generation(num_steps=10)] * 3, "meta": [{}] * 3}
    table = score_completions([get_reward(n) for n in names], names, completions, columns)
    total = [sum(w * v for w, v in zip(weights, row) if v == v) for row in table]
    assert [round(t, 9) for t in total] == [-0.8, 1.0, 0.1]
