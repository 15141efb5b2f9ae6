"""``latent_bottleneck``: the text after a latent segment sees the question only through the latents, in training
(the 4-D mask) and at inference (the cached and the reference decode loops alike)."""

import copy

import pytest
import torch

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


def test_hidden_span_runs_from_the_first_image_to_the_first_latent_start_and_takes_every_start():
    # row 0: text, two image pads, question, start pad pad end, text, a second segment (start pad end), text
    row0 = [1, 2, IMAGE, IMAGE, 3, 4, START, PAD, PAD, END, 6, START, PAD, END, 6]
    # row 1: left padding, an image and text but no latent segment
    row1 = [0, 0, 1, IMAGE, IMAGE, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6]
    ids = torch.tensor([row0, row1])
    attention = torch.tensor([[1] * 15, [0, 0] + [1] * 13])
    allowed = bottleneck_allowed(ids, attention, image_token_id=IMAGE, latent_start_id=START)

    # by hand: every position after the first start but the start tokens is blind to the image, the question and the
    # start tokens (whose states produce the first latents)
    blind, hidden = {7, 8, 9, 10, 12, 13, 14}, {2, 3, 4, 5, 6, 11}
    for q in range(15):
        for k in range(15):
            expected0 = k <= q and not (q in blind and k in hidden)
            expected1 = k <= q and k >= 2
            assert bool(allowed[0, q, k]) == expected0, (q, k)
            assert bool(allowed[1, q, k]) == expected1, (q, k)


def test_training_text_after_the_latents_does_not_see_the_question_picture(mirage_model, records):  # noqa: F811
    """Mirage stage 1 (the helper images teacher-forced as latents): changing the question pictures' pixels leaves
    every state after the first latent start as it was (the latent slots' too), but the start tokens' own."""
    model = bottlenecked(mirage_model)
    batch = model.collator()(records)
    other = dict(batch, pixel_values=batch["pixel_values"].flip(0))  # each question picture replaced by another's
    cfg = model.method.config

    def states(m, b):
        with torch.no_grad():
            embeds = m.embed_inputs(b)
            targets = torch.cat([pool_to_k(t, cfg.num_latent_tokens) for t in m.latent_targets(b)])
            embeds = embeds.index_put(m.latent_slots(b), targets.to(embeds.dtype))
            return m.run_language_model(embeds, b).last_hidden_state

    checked = 0
    for r, row in enumerate(batch["input_ids"].tolist()):
        if model.backbone.image_token_id not in row:
            continue  # the record without a question picture
        first_start = row.index(cfg.latent_start_id)
        starts = [t for t, i in enumerate(row) if i == cfg.latent_start_id]
        after = [t for t in range(first_start + 1, len(row)) if t not in starts and batch["attention_mask"][r, t]]
        for m, blind in ((model, True), (mirage_model, False)):
            a, b = states(m, batch)[r], states(m, other)[r]
            assert torch.allclose(a[after], b[after], atol=1e-5) == blind, (r, blind)
            for t in starts:  # the states that produce the latents read the picture
                assert not torch.allclose(a[t], b[t], atol=1e-5)
        checked += 1
    assert checked == 2


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
    with pytest.raises(ValueError, match="latent_bottleneck.*has none"):
        create_method(method, 32, latent_bottleneck=True)
