"""How a latent segment ends: ``latent_steps="model"`` (the released rule: the head's picked end token, else a latent,
at most ``max_latent_steps``) on hand-built heads, against ``fixed`` / ``auto``; the defaults; KV cache."""

import contextlib

import pytest
import torch

from vlatent.generation import LatentSegment
from vlatent.model import LatentVLM
from vlatent.testing import tiny_image

from test_generation import assert_same

IMAGES = [tiny_image(0), None, tiny_image(2)]
PROMPTS = ["Look.", "Hello", "Where?"]


@contextlib.contextmanager
def scripted_head(model, script=(), edit=None):
    """The LM head made to pick, for row r at call j (one call per decode step; rows start in latent mode, so call j
    of a segment's first decision is the one after j latents), the token ``script[r][j]``; at every other call the end
    token is ruled out, so a segment ends only where scripted or at the cap. ``edit(logits)`` replaces all that."""
    end = model.method.config.latent_end_id
    calls = []

    def hook(module, args, logits):
        j = len(calls)
        calls.append(j)
        if edit is not None:
            return edit(logits.clone())
        logits = logits.clone()
        logits[:, end] = float("-inf")
        for row, tokens in enumerate(script):
            if j in tokens:
                logits[row, tokens[j]] = logits[row].max() + 10.0
        return logits

    handle = model.backbone.model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def segment_lengths(model, g):
    """Latents in each segment, read off the step tokens (the row starts in latent mode): a pad is a latent, the end
    token closes a segment (also one with no latent)."""
    cfg, lengths, n = model.method.config, [], 0
    for t in g.token_ids:
        if t == cfg.latent_pad_id:
            n += 1
        elif t == cfg.latent_end_id:
            lengths.append(n)
            n = 0
    return lengths + ([n] if n else [])


def generate(model, n=3, **kw):
    return model.generate(IMAGES[:n], PROMPTS[:n], prefix=model.method.config.latent_start_token, **kw)


@pytest.mark.parametrize("cap", [8, 5])
def test_model_rule_stops_at_the_heads_end_token_or_at_the_cap(mirage_model, cap):
    """Mirage as released: the end token picked at decision j gives j latents (0 included: no LatentSegment), a second
    segment counts afresh, and a head that never picks it stops at MAX_LATENT_LEN = 8 (K is 4, so neither K nor a
    K-derived bound); KV-cached == recomputed, latents included."""
    cfg = mirage_model.method.config
    assert (cfg.max_latent_steps, cfg.num_latent_tokens) == (8, 4)
    end, start = cfg.latent_end_id, cfg.latent_start_id
    script = [{0: end, 2: start, 5: end}, {3: end}, {}]
    try:
        cfg.max_latent_steps = cap
        with scripted_head(mirage_model, script):
            cached = generate(mirage_model, max_new_tokens=12, latent_steps="model")
        with scripted_head(mirage_model, script):
            recomputed = generate(mirage_model, max_new_tokens=12, latent_steps="model", use_cache=False)
    finally:
        cfg.max_latent_steps = 8
    assert [segment_lengths(mirage_model, g) for g in cached] == [[0, 2], [3], [min(cap, 8)]]
    assert [s.k for s in cached[0].latent_segments] == [2]  # an empty segment leaves no LatentSegment
    assert cached[2].token_ids[:cap + 1] == [cfg.latent_pad_id] * cap + [end]
    for a, b in zip(cached, recomputed):
        assert_same(a, b)


def test_monet_caps_at_ten_and_the_other_rules_keep_their_meaning(tiny_base):
    """Monet as released: at most LATENT_SIZE = 10 latents (its K is 8, 2K 16). ``fixed`` still runs exactly K and
    ``auto`` still ends at the argmax end token after at least one latent, at most 2K."""
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="monet").eval()
    cfg = model.method.config
    assert (cfg.max_latent_steps, cfg.num_latent_tokens) == (10, 8)
    end = cfg.latent_end_id
    script = [{}, {9: end}, {0: end, 1: end}]
    runs = {}
    for rule in ("model", "fixed", "auto"):
        with scripted_head(model, script):
            runs[rule] = [segment_lengths(model, g)[0] for g in generate(model, max_new_tokens=18, latent_steps=rule)]
    assert runs == {"model": [10, 9, 0], "fixed": [8, 8, 8], "auto": [16, 9, 1]}


def test_sampled_end_token_ends_the_segment(mirage_model):
    """Sampling: the end token is drawn like any other token. The head ranks one ordinary token just above the end
    token (nothing else possible), so greedy decoding never ends a segment before the cap while sampling does."""
    cfg = mirage_model.method.config
    end, other = cfg.latent_end_id, mirage_model.tokenizer.convert_tokens_to_ids("\u0120five")

    def two_way(logits):
        edited = torch.full_like(logits, float("-inf"))
        edited[:, other], edited[:, end] = 0.01, 0.0
        return edited

    def lengths(**kw):
        with scripted_head(mirage_model, edit=two_way):
            gens = mirage_model.generate([None] * 8, ["Hello"] * 8, max_new_tokens=10,
                                         prefix=cfg.latent_start_token, latent_steps="model", **kw)
        return [segment_lengths(mirage_model, g)[0] for g in gens]

    assert lengths() == [8] * 8
    sampled = lengths(do_sample=True, generator=torch.Generator().manual_seed(0))
    assert min(sampled) < 8 and len(set(sampled)) >= 3, sampled


def test_default_is_fixed_and_the_setting_travels_with_the_checkpoint(tiny_base, tmp_path):
    """Every method defaults to ``fixed`` (the released rule ends the trained tiny Mirage's segments after one latent:
    docs/fidelity.md); ``method_config.latent_steps: model`` selects it for every ``generate`` that does not say,
    survives save / load, and a bad value is named at load time."""
    from vlatent.methods import create_method, list_methods

    assert {create_method(m, 8).config.latent_steps for m in list_methods() if m not in ("cocova", "sketchpad")} \
        == {"fixed"}
    assert create_method("cocova", 8, num_latent_tokens=2).config.latent_steps == "fixed"
    with pytest.raises(ValueError, match="latent_steps must be one of"):
        LatentVLM.from_pretrained(tiny_base, method="mirage", latent_steps="sometimes")
    with pytest.raises(ValueError, match="max_latent_steps must be a positive integer"):
        LatentVLM.from_pretrained(tiny_base, method="mirage", max_latent_steps=0)
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="mirage", latent_steps="model", max_latent_steps=6).eval()
    model = LatentVLM.from_pretrained(model.save_pretrained(tmp_path / "ckpt")).eval()
    assert (model.method.config.latent_steps, model.method.config.max_latent_steps) == ("model", 6)
    with scripted_head(model):
        default, fixed = (generate(model, n=1, max_new_tokens=10, **kw)[0] for kw in ({}, {"latent_steps": "fixed"}))
    assert isinstance(default.segments[0], LatentSegment) and default.segments[0].k == 6
    assert fixed.segments[0].k == 4
