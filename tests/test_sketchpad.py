"""Latent Sketchpad: backbone ViT hooks, build-time config errors, both SFT stages overfitting maze records,
generation of ViT-space sketches (multimodal / text only), the sketch decoder and its training script, and a DeepSpeed
run of stage 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from vlatent.data import load_records
from vlatent.decoders import SketchDecoder, SketchDecoderConfig, load_decoder, load_vision_encoder
from vlatent.methods import create_method
from vlatent.model import LatentVLM
from vlatent.testing import tiny_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train.sft import main as sft  # noqa: E402
from train.sketch_decoder import main as train_decoder  # noqa: E402

from test_training import maze  # noqa: E402, F401  (16 maze records from the real builder, one sketch per run)

TINY = {"sketch_size": 56, "head_heads": 4}  # 56 px sketch: 2 x 2 = 4 latent tokens, 16 ViT vectors of width 32


def run_tiny_recipe(name, model, data, out):
    """train/recipes/tiny/<name>.yaml in-process, without DeepSpeed (the slow test below runs it), 24 steps."""
    assert sft(["--config", str(ROOT / "train" / "recipes" / "tiny" / f"{name}.yaml"), "--set", f"model={model}",
                "--set", f"data.train={data}", "--set", f"training.output_dir={out}", "--set", "deepspeed=null",
                "--set", "training.max_steps=24", "--set", "training.logging_steps=4",
                "--set", "training.disable_tqdm=true"]) == 0
    return out, [e for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_base, maze):
    """Stage 1 (backbone, CE on sequences holding the true sketches) then stage 2 (vision head, backbone frozen)."""
    tmp = tmp_path_factory.mktemp("sketchpad")
    one = run_tiny_recipe("sketchpad_stage1", tiny_base, maze, tmp / "stage1")
    two = run_tiny_recipe("sketchpad_stage2", one[0], maze, tmp / "stage2")
    return {"stage1": one, "stage2": two}


def test_vision_features_are_the_vit_output_that_the_merger_turns_into_image_embeddings(mirage_model):
    backbone, processor = mirage_model.backbone, mirage_model.processor
    # 224 x 168 px -> 16 x 12 patches in 4 attention windows, so the window reordering is exercised
    batch = processor.image_processor(images=[tiny_image(0, (224, 168)), tiny_image(1, (56, 56))],
                                      size={"shortest_edge": 3136, "longest_edge": 224 * 224}, return_tensors="pt")
    with torch.no_grad():
        features = backbone.vision_features(batch["pixel_values"], batch["image_grid_thw"])
        embeds = backbone.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        assert [tuple(f.shape) for f in features] == [(192, 32), (16, 32)]
        assert backbone.vision_features_per_token == 4 == super(type(backbone), backbone).vision_features_per_token
        for f, e in zip(features, embeds):
            torch.testing.assert_close(backbone.project_vision_features(f), e)


def test_grid_coords_are_each_vectors_centre_in_runs_of_merged_patches():
    """A 1 x 2 grid of LM tokens, each a 2 x 2 run of patches: the picture is 2 patches high and 4 wide."""
    from vlatent.methods.sketchpad import grid_coords

    by_hand = [(0.25, 0.125), (0.25, 0.375), (0.75, 0.125), (0.75, 0.375),  # token (0, 0): rows 0-1, columns 0-1
               (0.25, 0.625), (0.25, 0.875), (0.75, 0.625), (0.75, 0.875)]  # token (0, 1): rows 0-1, columns 2-3
    torch.testing.assert_close(grid_coords(1, 2, 2), torch.tensor(by_hand))


def test_vision_head_reads_its_context_by_place():
    """The head copies a 4 x 4 picture into a sketch of the same grid (2 x 2 tokens of 2 x 2 vectors) in 300 steps:
    each sketch vector must find the context vector at its own place. Shuffling the context with its places changes
    nothing; shuffling only the features changes the output. Catches places left out, paired with the wrong vectors,
    or a query that does not carry its own place."""
    from vlatent.methods.sketchpad import VisionHead, grid_coords

    torch.manual_seed(0)
    head = VisionHead(hidden_size=8, feature_size=16, per_token=4, num_tokens=4, layers=1, heads=2)
    places = grid_coords(2, 2, 2)[None].expand(64, -1, -1)  # (64, 16, 2): the picture has the sketch's grid
    mask = torch.ones(64, 16, dtype=torch.bool)
    hidden = torch.zeros(64, 4, 8)  # nothing but the context tells the head what to draw
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        pictures = torch.randn(64, 16, 16)
        loss = F.mse_loss(head(hidden, pictures, mask, places), pictures)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pictures = torch.randn(64, 16, 16)
    with torch.no_grad():
        drawn = head(hidden, pictures, mask, places)
        order = torch.randperm(16)
        assert F.mse_loss(drawn, pictures) < 0.4  # 0.15; the best place-blind drawing (the context's mean): 0.92
        torch.testing.assert_close(head(hidden, pictures[:, order], mask, places[:, order]), drawn, atol=1e-5, rtol=0)
        assert F.mse_loss(head(hidden, pictures[:, order], mask, places), pictures) > 0.5


def test_a_checkpoint_whose_head_lacks_weights_is_refused_by_name(tiny_base, tmp_path):
    """A head saved without its places' weights (an older vlatent's) fails with the file named, not a bare torch
    error."""
    from safetensors.torch import load_file, save_file

    path = LatentVLM.from_pretrained(tiny_base, method="sketchpad", **TINY).save_pretrained(tmp_path / "ckpt")
    weights = load_file(str(path / "method.safetensors"))
    save_file({k: v for k, v in weights.items() if "locality" not in k}, str(path / "method.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)method\.safetensors.*does not fit method 'sketchpad'.*locality"):
        LatentVLM.from_pretrained(path)


def test_bad_config_fails_at_build_time(tiny_base):
    def fails(match, **cfg):
        with pytest.raises(ValueError, match=match):
            LatentVLM.from_pretrained(tiny_base, method="sketchpad", **{**TINY, **cfg})

    fails(r"vision_feature_size=1280 does not fit the backbone: the backbone's ViT width before the merger is 32",
          vision_feature_size=1280)
    fails(r"num_latent_tokens=16 does not fit the backbone: LM tokens of a 56x56 sketch for this backbone.* is 4",
          num_latent_tokens=16)
    fails(r"features_per_token=16 does not fit", features_per_token=16)
    fails(r"head_heads=5 does not divide vision_feature_size=32", head_heads=5)
    fails(r"sketchpad has stages 1 and 2", stage=3)
    with pytest.raises(ValueError, match="vision_feature_size is not set"):
        create_method("sketchpad", hidden_size=64, num_latent_tokens=4, features_per_token=4)
    with pytest.raises(ValueError, match="aligner_heads=3 does not divide aligner_dim=128"):
        SketchDecoderConfig(feature_dim=32, num_features=16, aligner_heads=3)


def test_collated_sketch_targets_have_the_configured_grid(tiny_base, maze):
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", **TINY)
    records = load_records(maze)[:2]
    batch = model.collator()(records)
    n_sketches = sum(sum(it["type"] == "latent" for m in r["messages"] for it in m["content"]) for r in records)
    assert batch["latent_target_grid_thw"].tolist() == [[1, 4, 4]] * n_sketches  # 176 px helper images -> 56 px
    wrong = model.collator(latent_target_size=None)(records)  # helper images at their own size: another grid
    with pytest.raises(ValueError, match=r"a helper image gives 64 ViT features, a sketch is 16"):
        model.method.sketch_targets(model, wrong)


def test_both_stages_overfit_maze_records(stages):
    _, log1 = stages["stage1"]
    assert set(log1[0]) >= {"loss", "loss_ce"} and "loss_latent_vit" not in log1[0]
    assert log1[-1]["loss"] < 0.6 * log1[0]["loss"], log1
    _, log2 = stages["stage2"]
    assert {"loss_latent_vit", "loss_latent_embed"} <= set(log2[0])
    for key in ("loss", "loss_latent_vit", "loss_latent_embed"):
        assert log2[-1][key] < 0.8 * log2[0][key], (key, log2)


def test_stage2_trains_only_the_vision_head(stages, tiny_base):
    one = LatentVLM.from_pretrained(stages["stage1"][0])
    two = LatentVLM.from_pretrained(stages["stage2"][0])
    base = LatentVLM.from_pretrained(tiny_base, method="sketchpad", **TINY)
    lm = "backbone.model.lm_head.weight"
    assert not torch.equal(one.state_dict()[lm], base.state_dict()[lm])  # stage 1 fine-tuned the backbone
    for key, value in two.backbone.state_dict().items():
        torch.testing.assert_close(value, one.backbone.state_dict()[key], msg=key)  # stage 2 kept it frozen
    head = "head.in_proj.0.weight"
    assert not torch.equal(two.method.state_dict()[head], one.method.state_dict()[head])
    assert two.method.config.stage == 2 and two.method.config.num_latent_tokens == 4


def test_head_in_stage1_trains_the_head_and_leaves_the_backbone_to_ce(tiny_base, maze):
    """Stage 1 with the head trained beside it: the backbone's gradient is exactly CE's (the head reads detached states
    and features, through the merger's norm with its parameters detached), the head's is not zero, and the loss is
    CE + vit_weight x the head's ViT-space L1. Catches any of those left attached, or the head left frozen."""
    grads, outs = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", stage=1, head_in_stage1=on,
                                          head_target="merger_norm", vit_weight=0.5, **TINY)
        outs[on] = model(model.collator()(load_records(maze)[:4]))
        outs[on].loss.backward()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    backbone = [n for n in grads[False] if "head" not in n]
    assert any("ln_q" in n for n in backbone) and any("visual.blocks" in n for n in backbone)
    for name in backbone:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=0, rtol=0, msg=name)
    head = [n for n in grads[True] if ".head." in n]
    assert head and not any(".head." in n for n in grads[False])
    assert sum(float(grads[True][n].abs().sum()) for n in head) > 0
    assert set(outs[True].losses) == {"ce", "latent_vit"} and set(outs[False].losses) == {"ce"}
    torch.testing.assert_close(outs[True].loss, outs[True].losses["ce"] + 0.5 * outs[True].losses["latent_vit"])
    torch.testing.assert_close(outs[True].losses["ce"], outs[False].losses["ce"])


def test_head_trains_states_moves_the_language_model_with_the_same_loss(tiny_base, maze):
    """``head_trains_states``: the same forward and loss as the head trained beside stage 1 on detached states, but
    the head's loss now also moves the language model (its layers' gradients are no longer those of the detached
    run). Catches the option ignored (states still detached) or changing what is computed."""
    grads, losses = {}, {}
    for trains in (False, True):
        torch.manual_seed(0)
        model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", stage=1, head_in_stage1=True,
                                          head_trains_states=trains, head_target="merger_norm", **TINY)
        out = model(model.collator()(load_records(maze)[:4]))
        out.loss.backward()
        losses[trains] = out.losses
        grads[trains] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name in ("ce", "latent_vit"):
        torch.testing.assert_close(losses[True][name], losses[False][name])
    lm = [n for n in grads[False] if ".language_model.layers." in n]
    assert lm and sum(not torch.equal(grads[True][n], grads[False][n]) for n in lm) == len(lm)
    head = [n for n in grads[False] if ".head." in n]
    for name in head:  # the head's own gradient is the same either way
        torch.testing.assert_close(grads[True][name], grads[False][name], msg=name)


def test_sketch_delimiters_leave_the_ce_when_switched_off_as_released(tiny_base, maze):
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", **TINY)
    c = model.method.config
    batch = model.collator()(load_records(maze)[:2])
    ids, labels = batch["input_ids"].tolist(), batch["labels"]
    delimiters = [(r, p) for r, row in enumerate(ids) for p, t in enumerate(row) if t in (c.latent_start_id,
                                                                                        c.latent_end_id)]
    assert len(delimiters) == 2 * int(batch["num_latent_segments"].sum()) > 0
    assert all(labels[r, p] == ids[r][p] for r, p in delimiters)  # ours: supervised (the model opens its sketches)
    assert torch.equal(model.method.text_labels(labels), labels)
    c.supervise_sketch_delimiters = False  # the release's: every other label as it was, the delimiters at -100
    expected = labels.clone()
    for r, p in delimiters:
        expected[r, p] = -100
    assert torch.equal(model.method.text_labels(labels), expected)


def test_text_only_share_turns_that_many_records_sketchless_for_a_seed(tiny_base, maze):
    records = load_records(maze)
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", text_only_share=0.5, **TINY)
    views, sampler = model.method.training_data(records, seed=3)
    again, _ = model.method.training_data(records, seed=3)
    other, _ = model.method.training_data(records, seed=4)
    changed = [i for i, (v, r) in enumerate(zip(views, records)) if v is not r]
    assert sampler is None and len(changed) == round(0.5 * len(records)) == 8
    assert again == views and other != views  # one seed, one draw
    for i in changed:  # the release's text-only sample: the question image stays, the sketches go, the text stays
        kinds = [[it["type"] for it in m["content"]] for m in views[i]["messages"]]
        assert kinds == [["image" if t == "image" else t for t in k if t != "latent"]
                         for k in ([it["type"] for it in m["content"]] for m in records[i]["messages"])]
        assert sum(k.count("image") for k in kinds) == 1 and not any("latent" in k for k in kinds)
        assert any(it["type"] == "latent" for m in records[i]["messages"] for it in m["content"])  # not mutated
    batch = model.collator()([views[i] for i in changed[:3]])
    assert "latent_target_pixel_values" not in batch and batch["num_latent_segments"].sum() == 0
    assert not (batch["input_ids"] == model.method.config.latent_pad_id).any()
    model.method.config.stage = 2  # stage 2 trains the records as written
    assert model.method.training_data(records, seed=3)[0] is records


def test_head_target_merger_norm_regresses_after_the_mergers_rmsnorm(tiny_base, maze):
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", stage=2, head_target="merger_norm", **TINY)
    batch = model.collator()(load_records(maze)[:2])
    ln_q = model.backbone.model.model.visual.merger.ln_q
    with torch.no_grad():
        ln_q.weight.uniform_(0.5, 1.5)  # not the identity, so the test sees the weight

    def by_hand(x):  # Qwen2RMSNorm
        x = x.float()
        return ln_q.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ln_q.variance_epsilon))

    seen = []
    handle = model.method.head.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        losses = model.method.training_losses(model, batch)
    handle.remove()
    targets = model.backbone.vision_features(batch["latent_target_pixel_values"], batch["latent_target_grid_thw"])
    expected = F.l1_loss(by_hand(seen[0]), by_hand(torch.stack(targets)))
    torch.testing.assert_close(losses["latent_vit"].float(), expected.float())
    # what the bench decodes and scores as the head's drawing given the true earlier steps: the same sketches
    drawn, true = model.method.teacher_forced_sketches(model, batch)
    torch.testing.assert_close(drawn.float(), by_hand(seen[0]).float())
    torch.testing.assert_close(true.float(), by_hand(torch.stack(targets)).float())
    from vlatent.methods.sketchpad import text_only

    sketchless = model.collator()([text_only(r) for r in load_records(maze)[:2]])
    with pytest.raises(ValueError, match="no helper images to teacher-force"):
        model.method.teacher_forced_sketches(model, sketchless)
    vit = LatentVLM.from_pretrained(tiny_base, method="sketchpad", stage=2, **TINY)  # ours: the raw ViT features
    assert torch.equal(vit.method.head_space(vit.backbone, targets[0]), targets[0])
    with pytest.raises(ValueError, match="head_target must be one of vit, merger_norm"):
        LatentVLM.from_pretrained(tiny_base, method="sketchpad", head_target="ln_q", **TINY)

def test_changed_weight_counts_the_cells_a_step_adds_more(tiny_base, maze):
    """``changed_weight``: by hand, a row's second sketch weights each vector 1 + w x its L1 change from the row's
    first over the batch's mean change; a row's first sketch (and a new row's) weights 1. Then through the training
    loss on maze records with several sketches per row (rows read off the records). Catches a previous sketch taken
    across rows, an unnormalised weight, or the weight left out of the loss."""
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", stage=2, changed_weight=3.0, **TINY)
    true = torch.tensor([[[0.0], [0.0]], [[0.0], [2.0]], [[3.0], [3.0]]])  # (s=3, n=2, d=1); rows 0, 0, 1
    drawn = torch.zeros_like(true)
    # errors 0 0 | 0 2 | 3 3; changes (row 0's second sketch only) 0, 2, mean 1: weights 1 1 | 1 7 | 1 1
    got = model.method.sketch_l1(drawn, true, torch.tensor([0, 0, 1]))
    assert got.item() == pytest.approx((2 * 7 + 3 + 3) / 12)
    assert model.method.sketch_l1(drawn, true, torch.tensor([0, 1, 2])).item() == pytest.approx(8 / 6)  # 1 per row

    records = load_records(maze)[:4]
    per_row = [sum(item["type"] == "latent" for item in r["messages"][-1]["content"]) for r in records]
    assert max(per_row) >= 2
    batch = model.collator()(records)
    seen = []
    handle = model.method.head.register_forward_hook(lambda mod, i, out: seen.append(out))
    with torch.no_grad():
        losses = model.method.training_losses(model, batch)
    handle.remove()
    targets = torch.stack(model.backbone.vision_features(batch["latent_target_pixel_values"],
                                                         batch["latent_target_grid_thw"]))  # (s, n, d)
    error = (seen[0] - targets).abs().mean(-1)  # (s, n)
    changes, first = [], 0
    for count in per_row:  # each row's sketches in order: the first weighs 1, the others by their change
        changes += [torch.zeros(targets.shape[1])]
        changes += [(targets[first + j] - targets[first + j - 1]).abs().mean(-1) for j in range(1, count)]
        first += count
    change = torch.stack(changes)
    mean = torch.cat([changes[i] for i in range(len(changes)) if change[i].any()]).mean()
    weight = 1 + 3.0 * change / mean
    torch.testing.assert_close(losses["latent_vit"], (error * weight).sum() / weight.sum())


def test_merger_norm_head_hands_decoder_normed_sketches_and_the_encoder_matches(tiny_base):
    from vlatent.decoders.sketch import BackboneVisionEncoder

    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", stage=2, head_target="merger_norm", **TINY).eval()
    ln_q = model.backbone.model.model.visual.merger.ln_q
    segment = model.generate([tiny_image(0)], ["Where next?"], max_new_tokens=6, prefix="<|latent_start|>")[0] \
        .latent_segments[0]
    unit = segment.features.float() / ln_q.weight.float()  # after an RMSNorm: each row at RMS 1 before its weight
    torch.testing.assert_close(unit.pow(2).mean(-1), torch.ones(unit.shape[0]), atol=1e-3, rtol=1e-3)
    encoder = BackboneVisionEncoder(model.backbone, model.processor, 56, norm=True)  # train/sketch_decoder.py's
    raw = BackboneVisionEncoder(model.backbone, model.processor, 56)
    picture = tiny_image(1)
    torch.testing.assert_close(encoder([picture]), ln_q(raw([picture])).float())

@pytest.fixture(scope="module")
def decoder(tmp_path_factory, tiny_base, maze):
    """A sketch decoder for the tiny ViT at the method's 56 px, trained briefly by its script on maze sketches."""
    out = tmp_path_factory.mktemp("decoder") / "sketch"
    assert train_decoder(["--images", str(maze.parent / "images"), "--pattern", "*-step*.png", "--encoder",
                          str(tiny_base), "--encoder-image-size", "56", "--image-size", "32", "--out", str(out),
                          "--vae-steps", "40", "--aligner-steps", "150",
                          "--path-color", "40,100,230"]) == 0
    return out


def test_decoder_script_learns_and_writes_a_loadable_decoder(decoder, tiny_base, maze):
    log = [e for e in json.loads((decoder / "train_log.json").read_text()) if e["phase"] == "aligner"]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], log
    result = json.loads((decoder / "metrics.json").read_text())
    # no PSNR bound: at this budget (40 VAE + 150 aligner steps) the decoder does not beat a constant colour, so
    # "psnr > 0" could never fail, and a bound against a baseline needs far longer training than a unit test affords
    assert result["held_out_images"] >= 1
    assert Image.open(decoder / "reconstructions.png").size[1] == 3 * (32 + 2)
    loaded = load_decoder(decoder)
    assert isinstance(loaded, SketchDecoder) and loaded.config.num_features == 16 and loaded.config.feature_dim == 32
    encoder = load_vision_encoder(str(tiny_base), 56)
    features = encoder([Image.open(p) for p in sorted((maze.parent / "images").glob("*-step1.png"))[:2]])
    pictures = loaded.decode(features)
    assert [p.size for p in pictures] == [(32, 32)] * 2
    assert pictures[0].tobytes() != pictures[1].tobytes()
    again = SketchDecoder.from_pretrained(decoder).decode(features[0])[0]
    assert again.tobytes() == loaded.decode([features[0]])[0].tobytes()  # saved and reloaded: the same picture
    with pytest.raises(ValueError, match=r"reads 16 x 32 per image"):
        loaded.decode(torch.zeros(64, 32))


def test_decoder_script_rejects_bad_arguments(tmp_path, capsys):
    assert train_decoder(["--images", str(tmp_path / "nowhere"), "--encoder", "x", "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train_decoder(["--images", str(tmp_path / "empty"), "--encoder", "x", "--out", str(tmp_path / "o")]) == 2
    assert "has 0 image(s)" in capsys.readouterr().err


def test_generate_sketches_and_decode_them(stages, decoder):
    model = LatentVLM.from_pretrained(stages["stage2"][0]).eval()
    images, prompts = [tiny_image(0), tiny_image(1), None], ["Where next?", "Sketch the route.", "Hi"]
    prefix = ["Go up 1.<|latent_start|>", "", "Go<|latent_start|>"]
    gens = model.generate(images, prompts, max_new_tokens=16, prefix=prefix)
    for g in (gens[0], gens[2]):
        segment = g.latent_segments[0]
        assert segment.latents.shape == (4, 64) and segment.features.shape == (16, 32)
        torch.testing.assert_close(model.backbone.project_vision_features(segment.features), segment.latents,
                                   atol=1e-5, rtol=1e-4)  # the latents are the sketch through the merger
    assert not torch.equal(gens[0].latent_segments[0].features, gens[2].latent_segments[0].features)  # context-aware
    pictures = load_decoder(decoder).render(gens[0].latent_segments + gens[2].latent_segments[:1])
    assert len(pictures) == len(gens[0].latent_segments) + 1 and pictures[0].size == (32, 32)
    # batched = one row at a time (rows in different modes do not disturb each other)
    alone = model.generate([images[0]], [prompts[0]], max_new_tokens=16, prefix=[prefix[0]])[0]
    torch.testing.assert_close(alone.latent_segments[0].features, gens[0].latent_segments[0].features,
                               atol=1e-4, rtol=1e-4)


def test_text_only_generation_never_sketches(stages):
    model = LatentVLM.from_pretrained(stages["stage2"][0]).eval()
    first = model.generate([tiny_image(0)], ["Where next?"], max_new_tokens=1)[0].segments[0].token_ids[0]
    head = model.backbone.model.get_output_embeddings().weight
    with torch.no_grad():  # make <|latent_start|> the greedy choice wherever `first` was
        head[model.method.config.latent_start_id] = 3 * head[first]
    sketching = model.generate([tiny_image(0)], ["Where next?"], max_new_tokens=8)[0]
    assert sketching.latent_segments and sketching.latent_segments[0].features is not None
    gen = model.generate([tiny_image(0)], ["Where next?"], max_new_tokens=8, allow_latents=False)[0]
    assert not gen.latent_segments and gen.num_steps == 8


@pytest.mark.slow
def test_stage2_under_deepspeed(tmp_path, stages, maze):
    """Stage 2 under DeepSpeed ZeRO-3 on CPU (one process, gloo): steps run, the head learns, the result generates."""
    cfg = tmp_path / "ds.yaml"  # the tiny stage-2 recipe's settings, under ZeRO-3
    cfg.write_text(yaml.safe_dump({
        "model": str(stages["stage1"][0]), "method_config": {"stage": 2}, "data": {"train": str(maze)},
        "freeze_vision_tower": True, "freeze_multi_modal_projector": True, "freeze_language_model": True,
        "deepspeed": str(ROOT / "train" / "ds_configs" / "zero3.json"),
        "training": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                     "max_steps": 6, "logging_steps": 1, "seed": 0, "disable_tqdm": True}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           str(ROOT / "train" / "sft.py"), "--config", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    logs = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    assert len(logs) == 6 and logs[-1]["loss_latent_vit"] < logs[0]["loss_latent_vit"], logs
    model = LatentVLM.from_pretrained(tmp_path / "out")
    gen = model.generate([tiny_image(0)], ["Where next?"], max_new_tokens=6, prefix="<|latent_start|>")[0]
    assert gen.latent_segments[0].features.shape == (16, 32)


def run_losses(model, batch):
    """``training_losses`` without gradients; also the embeddings the LM got and the head's outputs."""
    fed, heads = [], []
    hooks = [model.backbone.register_forward_pre_hook(lambda m, args: fed.append(args[0])),
             model.method.head.register_forward_hook(lambda m, i, out: heads.append(out))]
    with torch.no_grad():
        losses = model.method.training_losses(model, batch)
    for hook in hooks:
        hook.remove()
    return losses, fed[0], heads


def test_augment_sketches_feed_rerendered_sketches_and_regress_the_true_ones(tiny_base, maze, rough_decoder):
    from vlatent.data.chat import encode_images

    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", stage=2, augment_sketches=1,
                                      augment_decoder=str(rough_decoder), **TINY).train()
    backbone, method, records = model.backbone, model.method, load_records(maze)[:2]
    batch = model.collator()(records)
    with torch.no_grad():
        true = backbone.vision_features(batch["latent_target_pixel_values"], batch["latent_target_grid_thw"])
        method.training_data(records, seed=0)
        ks = method.augmenter.rounds(len(true))
        assert 0 in ks and 1 in ks  # slots of both kinds in one batch
        # by hand: the decoder's pictures of the true sketches, resized and encoded as the collator encodes sketches
        drawn = [f for f, k in zip(true, ks) if k]
        pictures = [p.resize((56, 56), Image.Resampling.BICUBIC) for p in SketchDecoder.from_pretrained(
            rough_decoder).decode(drawn)]
        again = iter(backbone.vision_features(*encode_images(
            model.processor, pictures, type(backbone).fixed_size_images_kwargs(model.processor, 56))))
        expected = torch.cat([backbone.project_vision_features(next(again) if k else f) for f, k in zip(true, ks)])
        plain = model.embed_inputs(batch)
    method.training_data(records, seed=0)  # the same seed: training_losses draws the same ks
    losses, fed, heads = run_losses(model, batch)
    b, t = model.latent_slots(batch)
    torch.testing.assert_close(fed[b, t], expected)  # k = 0: the true sketch; k = 1: its re-rendering
    k1 = torch.tensor(ks).repeat_interleave(method.config.num_latent_tokens).bool()
    assert not torch.allclose(fed[b, t][k1], backbone.project_vision_features(torch.cat(true))[k1])  # decoder used
    rest = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    rest[b, t] = False
    assert torch.equal(fed[rest], plain[rest])  # the question image and the text as they were
    with torch.no_grad():  # the head still regresses the true sketches
        torch.testing.assert_close(losses["latent_vit"], F.l1_loss(heads[0], torch.stack(true)))
        torch.testing.assert_close(losses["latent_embed"], F.l1_loss(
            backbone.project_vision_features(heads[0].flatten(0, 1)), backbone.project_vision_features(
                torch.cat(true))))


def test_augment_sketches_off_or_in_eval_leave_the_slots_true(tiny_base, maze, rough_decoder):
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", augment_sketches=2,
                                      augment_decoder=str(rough_decoder), **TINY)
    records = load_records(maze)[:2]
    batch = model.collator()(records)
    b, t = model.latent_slots(batch)
    with torch.no_grad():
        true = torch.cat(model.method.sketch_targets(model, batch)[0])
        true = model.backbone.project_vision_features(true)
    off, fed, _ = run_losses(model.eval(), batch)  # evaluation: no augmentation, no decoder loaded
    assert model.method.augmenter is None and torch.equal(fed[b, t], true)
    model.train().method.training_data(records, seed=1)
    on, fed, _ = run_losses(model, batch)
    assert not torch.allclose(fed[b, t], true) and on["ce"] != off["ce"]
    model.method.config.augment_sketches = 0  # off: the stage-1 step of today
    again, fed, _ = run_losses(model, batch)
    assert torch.equal(fed[b, t], true) and torch.equal(again["ce"], off["ce"])


def test_augment_sketches_config_errors(tiny_base, maze, rough_decoder, tmp_path):
    with pytest.raises(ValueError, match="augment_sketches > 0 .* set augment_decoder"):
        LatentVLM.from_pretrained(tiny_base, method="sketchpad", augment_sketches=2, **TINY)
    with pytest.raises(ValueError, match="augment_sketches must be an integer >= 0, got -1"):
        LatentVLM.from_pretrained(tiny_base, method="sketchpad", augment_sketches=-1, **TINY)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['augment_decoder', 'augment_sketches'\]"):
        LatentVLM.from_pretrained(tiny_base, method="mirage", augment_sketches=2, augment_decoder=str(rough_decoder))
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", augment_sketches=2,
                                      augment_decoder=str(tmp_path / "nowhere"), **TINY)
    records, c = load_records(maze)[:1], model.method.config
    with pytest.raises(FileNotFoundError, match="augment_decoder .*nowhere' is not a folder"):
        model.method.training_data(records)  # checked when training starts, before the first step
    (tmp_path / "depth").mkdir()
    (tmp_path / "depth" / "decoder_config.json").write_text(json.dumps({"type": "depth_vq"}))
    c.augment_decoder = str(tmp_path / "depth")
    with pytest.raises(ValueError, match="augment_decoder .* is not a sketch decoder: .*'depth_vq'"):
        model.method.training_data(records)
    c.augment_decoder = str(SketchDecoder(SketchDecoderConfig(feature_dim=64, num_features=16, image_size=32))
                            .save_pretrained(tmp_path / "wide"))
    with pytest.raises(ValueError, match="reads 16 x 64 features per picture, a sketch is 16 x 32"):
        model.method.training_data(records)
    c.augment_decoder = str(rough_decoder)
    draws = []
    for seed in (3, 3, 4):
        model.method.training_data(records, seed=seed)
        draws.append(model.method.augmenter.rounds(32))
    assert draws[0] == draws[1] != draws[2] and set(draws[0]) == {0, 1, 2}  # one seed, one draw, k in 0..2
