"""``latent_bottleneck``: the text after a latent segment sees the question only through the latents, in training
(the 4-D mask) and at inference (the cached and the reference decode loops alike)."""

import copy

import pytest
import torch

from vlatent.analysis import intervene
from vlatent.methods import create_method
from vlatent.methods.base import bottleneck_allowed
from vlatent.methods.mirage import pool_to_k
from vlatent.testing import tiny_image

from conftest import PREFIXES, PROMPTS
from test_model import records  # noqa: F401  (the module's records fixture)

IMAGE, START, PAD, END = 9, 7, 8, 5  # token ids of the hand-made rows


def bottlenecked(model):
    model = copy.deepcopy(model)
    model.method.config.latent_bottleneck = True
    return model


def test_blind_positions_see_only_what_follows_the_first_latent_start():
    # row 0: text, two image pads, question, start pad pad end, text, a second segment (start pad end), text
    row0 = [1, 2, IMAGE, IMAGE, 3, 4, START, PAD, PAD, END, 6, START, PAD, END, 6]
    # row 1: left padding, an image and text but no latent segment
    row1 = [0, 0, 1, IMAGE, IMAGE, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6]
    ids = torch.tensor([row0, row1])
    attention = torch.tensor([[1] * 15, [0, 0] + [1] * 13])
    allowed = bottleneck_allowed(ids, attention, START)

    # by hand: every position after the first start but the start tokens is blind to everything up to that start and
    # to the start tokens (whose states produce the first latents); the start tokens see all before them
    blind, hidden = {7, 8, 9, 10, 12, 13, 14}, {0, 1, 2, 3, 4, 5, 6, 11}
    for q in range(15):
        for k in range(15):
            expected0 = k <= q and not (q in blind and k in hidden)
            expected1 = k <= q and k >= 2
            assert bool(allowed[0, q, k]) == expected0, (q, k)
            assert bool(allowed[1, q, k]) == expected1, (q, k)


def test_training_states_after_the_first_start_follow_the_latents_alone(mirage_model, records):  # noqa: F811
    """Mirage stage 1 (the helper images teacher-forced as latents): another question picture, or a longer question
    (every later position shifted), leaves every state after the first latent start as it was, the latent slots'
    too, but the start tokens' own; without the bottleneck both change them."""
    model = bottlenecked(mirage_model)
    cfg = model.method.config
    longer = copy.deepcopy(records)
    for r in longer:
        r["messages"][0]["content"][-1]["text"] = "Where does the path go next, and why?"

    def states(m, recs, flip=False):
        batch = m.collator()(recs)
        if flip:  # each question picture replaced by another's
            batch = dict(batch, pixel_values=batch["pixel_values"].flip(0))
        with torch.no_grad():
            embeds = m.embed_inputs(batch)
            targets = torch.cat([pool_to_k(t, cfg.num_latent_tokens) for t in m.latent_targets(batch)])
            embeds = embeds.index_put(m.latent_slots(batch), targets.to(embeds.dtype))
            hidden = m.run_language_model(embeds, batch).last_hidden_state
        rows = []
        for r, row in enumerate(batch["input_ids"].tolist()):
            n = int(batch["attention_mask"][r].sum())
            first = row.index(cfg.latent_start_id)
            after = [t for t in range(first + 1, n) if row[t] != cfg.latent_start_id]
            rows.append((hidden[r, first], hidden[r, after]))
        return rows

    for m, blind in ((model, True), (mirage_model, False)):
        base, flipped, shifted = states(m, records), states(m, records, flip=True), states(m, longer)
        for r, ((start, after), (_, after_longer)) in enumerate(zip(base, shifted)):
            assert torch.allclose(after, after_longer, atol=1e-4) == blind, (r, blind)
            if r in (0, 1):  # the records with a question picture ("c" has none)
                assert torch.allclose(after, flipped[r][1], atol=1e-5) == blind, (r, blind)
                assert not torch.allclose(start, flipped[r][0], atol=1e-5)  # the start token reads the picture


def test_generation_text_after_the_latents_follows_them_alone(mirage_model):
    """Latents held fixed (a hook): the text after them is the same for two pictures under the bottleneck, and not
    without it; left free, the latents differ by picture; the cached loop writes what the reference loop writes."""
    images = [[tiny_image(seed=1)], [tiny_image(seed=2)]]
    prompts, prefix = ["Which way first?"] * 2, ["Let me think.<|latent_start|>"] * 2
    ones = lambda z, context: torch.ones_like(z)  # noqa: E731
    model = bottlenecked(mirage_model)
    run = lambda m, **kw: m.generate(images, prompts, prefix=prefix, max_new_tokens=16, **kw)  # noqa: E731

    held = run(model, latent_hook=ones)
    assert held[0].text == held[1].text
    loose = run(mirage_model, latent_hook=ones)
    assert loose[0].text != loose[1].text
    assert [g.text for g in run(model, latent_hook=ones, use_cache=False)] == [g.text for g in held]

    free = run(model)
    assert not torch.allclose(free[0].segments[0].latents, free[1].segments[0].latents)


def test_a_swap_under_the_bottleneck_writes_the_donors_continuation(mirage_model):
    """Everything after the first latent start sees only the latents, so a run fed another example's latents goes on
    exactly as that donor's own run did (the bench's donor column then equals the plain accuracy). Any leak of the own
    picture or question into the decode loop breaks the equality; without the option the runs differ."""
    images = [[tiny_image(seed=s)] for s in (1, 2, 3)]
    prompts = ["Which way first?", "Where is the goal in this picture?", "Left?"]  # lengths differ: positions shift
    kw = dict(prefix=["Let me think.<|latent_start|>"] * 3, max_new_tokens=16)
    for model, same in ((bottlenecked(mirage_model), True), (mirage_model, False)):
        runs = intervene(model, images, prompts, "swap", **kw)
        assert [r.donor for r in runs] == [1, 2, 0]
        donors = [runs[r.donor].baseline for r in runs]
        assert all(r.baseline.latent_segments for r in runs)
        followed = [r.generation.token_ids == d.token_ids for r, d in zip(runs, donors)]
        assert all(followed) if same else not all(followed), followed


def test_cached_decode_matches_the_reference_loop_with_several_segments(switching_model):
    """Rows that open latent segments at different, data-dependent steps (several per answer): the cached loop's
    per-step key mask equals the reference loop's 4-D mask, text and latents alike."""
    model = bottlenecked(switching_model)
    images = [[tiny_image(seed=s)] for s in range(len(PROMPTS))]
    kw = dict(prefix=PREFIXES, max_new_tokens=24)
    cached = model.generate(images, PROMPTS, **kw)
    reference = model.generate(images, PROMPTS, use_cache=False, **kw)
    assert sum(len(g.latent_segments) for g in cached) >= 3
    for c, r in zip(cached, reference):
        assert c.token_ids == r.token_ids
        for a, b in zip(c.latent_segments, r.latent_segments):
            torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
    plain = switching_model.generate(images, PROMPTS, **kw)
    assert [g.token_ids for g in plain] != [g.token_ids for g in cached]  # the mask changed what was written


@pytest.mark.parametrize("method", ["text", "perception"])
def test_methods_without_latent_segments_refuse_it(method):
    with pytest.raises(ValueError, match="latent_bottleneck.*has no latent segments"):
        create_method(method, 32, latent_bottleneck=True)
