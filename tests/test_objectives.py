"""Objectives recomputed in the test from their formulas (Mirage CE, Sketchpad stages 1-2, CoCoVa's contrastive and
diffusion losses, VLPO with and without KL), on tiny real models, so that a wrong position, axis, target or sign in
the library fails here; and Sketchpad's generated sketch equal to the teacher-forced head on the same sequence."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlatent.data import load_records
from vlatent.generation import normalize_inputs
from vlatent.model import LatentVLM
from vlatent.testing import tiny_image
from vlatent.training import VLPOConfig
from vlatent.training.vlpo import VLPOModel, action_log_probs, build_rollouts

from conftest import PREFIXES, PROMPTS
from test_model import write_records

SKETCH = {"sketch_size": 56, "head_heads": 4}  # 4 latent tokens of 4 ViT vectors (width 32) per sketch
COCOVA = dict(num_latent_tokens=4, lq_hidden_size=32, lq_heads=4, lq_layers=1, num_queries=4, num_iterations=2,
              num_selected=8, contrastive_dim=16, recon_size=16, unet_channels=[16, 32], unet_norm_groups=8,
              diffusion_steps=100)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """'a': question image + one latent segment, 'b': two segments, 'c': no question image."""
    return load_records(write_records(tmp_path_factory.mktemp("objectives"), [("a", 1, True), ("b", 2, True),
                                                                              ("c", 1, False)]))


def slots(batch, pad_id):
    """(row, position) of every latent pad, scanned here row by row."""
    ids = batch["input_ids"]
    return [(r, p) for r in range(ids.shape[0]) for p in range(ids.shape[1]) if ids[r, p] == pad_id]


def inline_ce(model, hidden, labels):
    """Mean next-token CE: the state at p predicts the label at p + 1, positions labelled -100 skipped."""
    terms = []
    for r in range(labels.shape[0]):
        for p in range(labels.shape[1] - 1):
            if labels[r, p + 1] != -100:
                logp = model.backbone.logits(hidden[r, p][None]).float().log_softmax(-1)[0]
                terms.append(-logp[labels[r, p + 1]])
    return torch.stack(terms).mean()


def test_mirage_stage1_ce_is_next_token_ce_on_the_labelled_positions(mirage_model, records):
    batch = mirage_model.collator()(records)
    b, t = mirage_model.latent_slots(batch)
    assert (batch["labels"][b, t] == -100).all()  # latent pads are never CE targets
    with torch.no_grad():
        got = mirage_model(batch).losses["ce"]
        from vlatent.methods.mirage import pool_to_k

        targets = torch.cat([pool_to_k(f, mirage_model.method.config.num_latent_tokens)
                             for f in mirage_model.latent_targets(batch)])
        embeds = mirage_model.embed_inputs(batch).index_put((b, t), targets)
        hidden = mirage_model.run_language_model(embeds, batch).last_hidden_state
    torch.testing.assert_close(got, inline_ce(mirage_model, hidden, batch["labels"]))


# ---------------------------------------------------------------------------------------------------------------------
# Sketchpad


def places(grid_thw):
    """Each ViT vector's centre in its picture, in [0, 1], by hand: Qwen2.5-VL's runs of 2 x 2 patches (raster order
    inside), the runs in raster order over the merged grid."""
    _, h, w = grid_thw.tolist()
    return torch.tensor([((2 * r + dr + 0.5) / h, (2 * c + dc + 0.5) / w) for r in range(h // 2) for c in range(w // 2)
                         for dr in (0, 1) for dc in (0, 1)])


@pytest.fixture(scope="module")
def sketchpad(tiny_base):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_base, method="sketchpad", stage=2, ce_weight=0.5, **SKETCH).eval()


def test_sketchpad_stage2_losses_recomputed_per_sketch(sketchpad, records):
    """Per sketch: the head reads the K LM states *before* its slots (teacher forced with the true sketch), its global
    context is the row's earlier question images and earlier sketches (not its own), each vector with its place in
    its picture; L1 in ViT space and after the merger. Catches the target leaking (state at the slot itself), the
    sketch's own target in its context, places on the wrong axis or of another picture, MSE for L1, or the merger's
    side left out."""
    model, m = sketchpad, sketchpad.method
    backbone, k = model.backbone, m.config.num_latent_tokens
    batch = model.collator()(records)
    with torch.no_grad():
        got = model(batch).losses
        targets = backbone.vision_features(batch["latent_target_pixel_values"], batch["latent_target_grid_thw"])
        question = backbone.vision_features(batch["pixel_values"], batch["image_grid_thw"])  # rows 0 and 1
        where = slots(batch, m.config.latent_pad_id)
        embeds = model.embed_inputs(batch).clone()
        projected = backbone.project_vision_features(torch.cat(targets))
        for i, (r, p) in enumerate(where):
            embeds[r, p] = projected[i]
        hidden = model.run_language_model(embeds, batch).last_hidden_state
        vit, merged, seen = [], [], {}
        for s in range(len(where) // k):
            r, first = where[s * k]
            context = ([(question[r], places(batch["image_grid_thw"][r]))] if r < 2 else []) + seen.get(r, [])
            before = torch.stack([hidden[r, p - 1] for _, p in where[s * k:(s + 1) * k]])
            ctx = torch.cat([f for f, _ in context])[None] if context else hidden.new_zeros(1, 0, 32)
            at = torch.cat([c for _, c in context])[None] if context else hidden.new_zeros(1, 0, 2)
            pred = m.head(before[None], ctx, torch.ones(ctx.shape[:2], dtype=torch.bool), at)[0]
            vit.append((pred - targets[s]).abs())
            merged.append((backbone.project_vision_features(pred) - backbone.project_vision_features(targets[s])).abs())
            seen.setdefault(r, []).append((targets[s], places(batch["latent_target_grid_thw"][s])))
    assert len(vit) == 4
    torch.testing.assert_close(got["latent_vit"], torch.cat(vit).mean(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["latent_embed"], torch.cat(merged).mean(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["ce"], inline_ce(model, hidden, batch["labels"]), atol=1e-5, rtol=1e-4)
    weights = m.loss_weights()
    assert weights == {"ce": 0.5, "latent_vit": 1.0, "latent_embed": 1.0}


def test_sketchpad_stage1_is_ce_on_sequences_holding_the_true_sketch(tiny_base, records):
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", stage=1, **SKETCH).eval()
    batch = model.collator()(records)
    with torch.no_grad():
        out = model(batch)
        targets = model.backbone.vision_features(batch["latent_target_pixel_values"], batch["latent_target_grid_thw"])
        embeds = model.embed_inputs(batch).index_put(model.latent_slots(batch),
                                                     model.backbone.project_vision_features(torch.cat(targets)))
        hidden = model.run_language_model(embeds, batch).last_hidden_state
    assert set(out.losses) == {"ce"}
    torch.testing.assert_close(out.loss, inline_ce(model, hidden, batch["labels"]), atol=1e-5, rtol=1e-4)


def test_sketchpad_generated_sketch_is_the_head_on_its_own_teacher_forced_sequence(sketchpad, records):
    """Train == generate: put the generated latents in the slots of the same sequence as training collates it; the
    head on the states before the slots, with the question image as context, gives back the generated sketch. Catches
    inference reading another position, another context or another within-sketch position than training."""
    model, m = sketchpad, sketchpad.method
    record = records[0]  # question image, "Let me sketch it." + one sketch
    gen = model.generate([record["images"][0]], ["Where next?"], max_new_tokens=6,
                         prefix="Let me sketch it.<|latent_start|>")[0]
    segment = gen.latent_segments[0]
    assert segment.latents.shape == (4, 64) and segment.features.shape == (16, 32)
    batch = model.collator()([record])
    where = slots(batch, m.config.latent_pad_id)
    with torch.no_grad():
        embeds = model.embed_inputs(batch).clone()
        for j, (r, p) in enumerate(where):
            embeds[r, p] = segment.latents[j]
        hidden = model.run_language_model(embeds, batch).last_hidden_state
        context = model.backbone.vision_features(batch["pixel_values"], batch["image_grid_thw"])[0][None]
        before = torch.stack([hidden[r, p - 1] for r, p in where])[None]
        at = places(batch["image_grid_thw"][0])[None]
        pred = m.head(before, context, torch.ones(context.shape[:2], dtype=torch.bool), at)[0]
    torch.testing.assert_close(segment.features, pred, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(segment.latents, model.backbone.project_vision_features(pred), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# CoCoVa


@pytest.fixture(scope="module")
def cocova(tiny_base):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_base, method="cocova", **COCOVA).eval()


def test_cocova_contrastive_is_symmetric_infonce_on_centred_pooled_views(cocova, records):
    """CLIP(thought, helper image) and CLIP(thought, text after the segment), averaged; each view mean-pooled,
    centred over the batch, projected and normalised; InfoNCE both ways at the learned scale. Catches a one-way
    InfoNCE, a wrong text span, uncentred views or another segment's image as the positive."""
    model, m = cocova, cocova.method
    batch = model.collator()(records)
    where = slots(batch, m.config.latent_pad_id)
    k = m.config.num_latent_tokens
    torch.manual_seed(1)
    segments = torch.randn(len(where) // k, k, m.config.lq_hidden_size)
    rows = torch.tensor([where[s * k][0] for s in range(len(segments))])
    last = torch.tensor([where[s * k + k - 1][1] for s in range(len(segments))])
    ids = batch["input_ids"]
    end_of_turn = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        got = m._contrastive(model, batch, segments, rows, last)
        visual = torch.stack([h.mean(0) for h in model.latent_targets(batch)])
        text = []
        for r, p in zip(rows.tolist(), last.tolist()):
            span = []  # from the segment's end token to the next segment's start or through the end of the turn
            for q in range(p + 1, ids.shape[1]):
                if ids[r, q] == m.config.latent_start_id:
                    break
                span.append(q)
                if ids[r, q] == end_of_turn:
                    break
            text.append(model.backbone.embed_tokens(ids[r, span]).mean(0))
        text = torch.stack(text)

        def view(x, proj):
            return F.normalize(proj(x - x.mean(0)), dim=-1)

        scale = m.logit_scale.exp()
        thought = view(segments.mean(1), m.thought_proj)
        labels = torch.arange(len(segments))

        def clip(other):
            logits = scale * thought @ other.T
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

        expected = (clip(view(visual, m.visual_proj)) + clip(view(text, m.text_proj))) / 2
    assert len(segments) == 4
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_cocova_ce_is_next_token_ce_over_the_filled_sequence(cocova, records):
    """CE on the sequence whose slots hold the LQ-Former's latents (the ones the training pass made, caught with a
    forward hook), recomputed here. Catches CE taken over the unfilled pads or an unshifted CE."""
    model, m = cocova, cocova.method
    batch = model.collator()(records)
    made = []
    hook = m.lq_former.register_forward_hook(lambda mod, args, out: made.append(out.latents.detach()))
    try:
        with torch.no_grad():
            got = model(batch).losses["ce"]
    finally:
        hook.remove()
    where = slots(batch, m.config.latent_pad_id)
    latents = torch.cat(made)
    assert latents.shape[0] == len(where)
    order = sorted(range(len(where)), key=lambda i: (where[i][1], where[i][0]))  # filled pass by pass, by position
    with torch.no_grad():
        embeds = model.embed_inputs(batch).clone()
        for n, i in enumerate(order):
            embeds[where[i]] = latents[n]
        hidden = model.run_language_model(embeds, batch).last_hidden_state
    torch.testing.assert_close(got, inline_ce(model, hidden, batch["labels"]), atol=1e-5, rtol=1e-4)


def test_cocova_diffusion_predicts_the_noise_of_the_ddpm_forward_process(cocova, records):
    """With the same seed: x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps (linear betas 1e-4..0.02), the UNet conditioned
    on the K thoughts, MSE against eps. Catches an x0 target, a wrong noising rule or unconditioned UNet."""
    model, m = cocova, cocova.method
    batch = model.collator()(records)
    images = batch["latent_target_images"]
    torch.manual_seed(2)
    segments = torch.randn(images.shape[0], m.config.num_latent_tokens, m.config.lq_hidden_size)
    with torch.no_grad():
        torch.manual_seed(3)
        got = m._diffusion(batch, segments)
        torch.manual_seed(3)
        noise = torch.randn_like(images)
        steps = torch.randint(0, m.config.diffusion_steps, (images.shape[0],))
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, m.config.diffusion_steps), 0)[steps][:, None, None, None]
        noisy = abar.sqrt() * images + (1 - abar).sqrt() * noise
        expected = ((m.unet(noisy, steps, encoder_hidden_states=segments).sample - noise) ** 2).mean()
        other = ((m.unet(noisy, steps, encoder_hidden_states=segments.flip(0)).sample - noise) ** 2).mean()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, other)  # the thoughts condition the reconstruction


# ---------------------------------------------------------------------------------------------------------------------
# VLPO: the loss of a rollout batch, with and without the KL term


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_vlpo_loss_is_the_clipped_surrogate_plus_beta_kl(switching_model, beta):
    """GRPO aggregation (per row: mean over its actions; then the mean over rows) of
    -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta (exp(ref - lp) - (ref - lp) - 1), r = exp(lp - old), over text
    and latent actions, with old/ref log-probs chosen so every clip case occurs. Catches a flipped sign, a swapped
    ratio, an unmasked mean or a KL in the wrong direction."""
    model, sigma = switching_model, 0.05
    images, prompts, prefixes = normalize_inputs([tiny_image(0), tiny_image(1), None], PROMPTS, PREFIXES)
    gens = model.generate(images, prompts, max_new_tokens=12, prefix=prefixes, latent_sigma=sigma,
                          generator=torch.Generator().manual_seed(0))
    advantages = torch.tensor([1.5, -0.7, 0.4])
    r = build_rollouts(model, images, prompts, prefixes, gens, advantages, ["a", "b", "c"])
    config = VLPOConfig(num_generations=3, max_completion_length=12, prefix="<|latent_start|>", latent_sigma=sigma,
                        beta=beta, loss_type="grpo", epsilon=0.2, epsilon_high=0.28)
    with torch.no_grad():
        lp = action_log_probs(model, r, 1.0, sigma, True)
        gen = torch.Generator().manual_seed(1)
        r.old_log_probs = lp + torch.empty(lp.shape).uniform_(-0.5, 0.5, generator=gen)
        r.ref_log_probs = lp + torch.empty(lp.shape).uniform_(-1.0, 1.0, generator=gen)
        got = VLPOModel(model, config)(r).loss
    mask = r.text_mask | r.latent_mask
    assert r.latent_mask.any() and (~mask).any()
    rows = []
    for i in range(3):
        terms = []
        for c in range(lp.shape[1]):
            if not mask[i, c]:
                continue
            a, x = float(advantages[i]), float(lp[i, c])
            ratio = math.exp(x - float(r.old_log_probs[i, c]))
            term = -min(ratio * a, min(max(ratio, 0.8), 1.28) * a)
            d = float(r.ref_log_probs[i, c]) - x
            terms.append(term + beta * (math.exp(d) - d - 1))
        rows.append(sum(terms) / len(terms))
    assert got.item() == pytest.approx(sum(rows) / 3, rel=1e-4, abs=1e-5)
