"""Sampling on fixed logits: which tokens top-p keeps, draw frequencies under temperature within a binomial bound, and
generation with different seeds drawing different text (same seed: the same)."""

import math

import pytest
import torch

from vlatent.generation import _pick
from vlatent.testing import tiny_image

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
N = 20000


def frequencies(logits, **kw):
    gen = torch.Generator().manual_seed(0)
    draws = _pick(logits.expand(N, -1), do_sample=True, generator=gen, **kw)
    return torch.bincount(draws, minlength=logits.shape[-1]).double() / N


def assert_frequencies(freq, expected):
    """Each frequency within 5 binomial standard deviations of its probability (exact zeros stay zero)."""
    for f, p in zip(freq.tolist(), expected.tolist()):
        assert abs(f - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-12) / N), (freq, expected)


@pytest.mark.parametrize("top_p, kept", [(0.45, 1), (0.75, 2), (0.9, 3), (0.99, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    """Nucleus: sorted probabilities 0.5, 0.3, 0.15, 0.05; keep tokens until their sum reaches top_p (the token that
    crosses it included), renormalise. Catches a nucleus one token short (cumsum > p) or one too long."""
    logits = PROBS.log()[[2, 0, 3, 1]]  # not in sorted order: the kept set is found by sorting
    expected = torch.zeros(4)
    expected[:kept] = PROBS[:kept] / PROBS[:kept].sum()
    assert_frequencies(frequencies(logits, temperature=1.0, top_p=top_p), expected[[2, 0, 3, 1]])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_logits(temperature):
    """softmax(logits / T): p_i^(1/T) renormalised."""
    expected = PROBS ** (1 / temperature)
    assert_frequencies(frequencies(PROBS.log(), temperature=temperature, top_p=1.0), expected / expected.sum())


def test_greedy_is_the_argmax_and_temperature_and_top_p_compose():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert _pick(logits, False, 1.0, 1.0, None).tolist() == [1, 0]
    # T = 0.5 squares the probabilities: 0.5, 0.3, 0.15, 0.05 -> 0.25, 0.09, ... of 0.365; top_p 0.8 keeps 2 tokens
    sq = PROBS**2 / (PROBS**2).sum()
    expected = torch.tensor([sq[0], sq[1], 0, 0]) / (sq[0] + sq[1])
    assert_frequencies(frequencies(PROBS.log(), temperature=0.5, top_p=0.8), expected)


def test_different_seeds_draw_different_text_and_a_seed_repeats(mirage_model):
    def sample(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        return [g.token_ids for g in mirage_model.generate([tiny_image(0), None], ["Look.", "Hello there"],
                                                           max_new_tokens=8, do_sample=True, generator=gen, **kw)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1)[0] != sample(1)[1]  # the rows of a batch draw on their own
    greedy = [g.token_ids for g in mirage_model.generate([tiny_image(0), None], ["Look.", "Hello there"],
                                                         max_new_tokens=8)]
    assert sample(1, temperature=1e-3) == greedy  # a near-zero temperature is the argmax
