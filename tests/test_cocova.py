"""CoCoVa's LQ-Former: config errors at build time, the three named losses and their gradients, training latents
equal to the ones generation feeds back, inspection (similarity maps, diffusion reconstruction), and a DeepSpeed run
that overfits 16 records."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vlatent.data import load_records
from vlatent.model import LatentVLM

from test_training import check_seeding, finish, launch, recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_latent_tokens=4, lq_hidden_size=32, lq_heads=4, lq_layers=1, num_queries=4, num_iterations=2,
            num_selected=8, contrastive_dim=16, recon_size=16, unet_channels=[16, 32], unet_norm_groups=8,
            diffusion_steps=100)


@pytest.fixture(scope="module")
def depth_data(tmp_path_factory):
    """20 depth records (one latent segment each) from the real builder: 16 train."""
    out = tmp_path_factory.mktemp("depth") / "data"
    subprocess.run([sys.executable, "-m", "data_builders.depth", "--out", str(out), "--n", "20", "--seed", "0"],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return out


@pytest.fixture(scope="module")
def model(tiny_base):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_base, method="cocova", **TINY)


@pytest.mark.parametrize("override, message", [
    ({"lq_hidden_size": 30}, "lq_hidden_size=30 is not divisible by lq_heads=4"),
    ({"recon_size": 17}, "recon_size=17 must be a multiple of 2"),
    ({"unet_channels": [12, 32]}, "must be a multiple of unet_norm_groups=8"),
    ({"num_selected": 0}, "num_selected must be a positive integer"),
])
def test_bad_config_fails_at_build_time(tiny_base, override, message):
    with pytest.raises(ValueError, match=message):
        LatentVLM.from_pretrained(tiny_base, method="cocova", **{**TINY, **override})


@pytest.mark.parametrize("channels, groups", [([16, 32], 8), ([64, 128], 32)])
def test_unet_attention_heads_are_eight_wide(channels, groups):
    """Every attention of the diffusion decoder splits its width into heads 8 wide (diffusers reads its
    ``attention_head_dim`` as a head count: 8 heads of width 2 at 16 channels, 4x the score matrices)."""
    from diffusers.models.attention_processor import Attention

    from vlatent.methods import create_method

    method = create_method("cocova", hidden_size=128, **{**TINY, "unet_channels": channels, "unet_norm_groups": groups})
    attentions = [m for m in method.unet.modules() if isinstance(m, Attention)]
    assert attentions  # the cross-attention blocks and the mid block
    assert sorted({a.inner_dim for a in attentions}) == channels  # every level of the UNet has attention
    for a in attentions:
        assert a.inner_dim == 8 * a.heads, (a.inner_dim, a.heads)


def test_losses_and_their_gradients(model, depth_data):
    batch = model.collator()(load_records(depth_data / "train.jsonl")[:3])
    assert batch["latent_target_images"].shape == (3, 3, 16, 16)
    model.train()
    model.zero_grad()
    out = model(batch)
    assert set(out.losses) == {"ce", "contrastive", "diffusion"}
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    weights = model.method.loss_weights()
    torch.testing.assert_close(out.loss, sum(weights[k] * v for k, v in out.losses.items()))
    out.loss.backward()
    method = model.method
    for name in ("lq_former.queries", "lq_former.score_visual.weight", "lq_former.layers.0.visual_gate",
                 "lq_former.layers.0.thought_gate", "thought_proj.weight", "text_proj.weight", "logit_scale",
                 "unet.conv_in.weight"):
        grad = dict(method.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()
    model.eval()


def test_loss_gradient_norms(model, depth_data):
    """Each weighted loss's gradient norm: the total is what clip_grad_norm_ sees after the Trainer's backward, a
    loss's norm scales with its weight, and no .grad is left behind."""
    from vlatent.analysis import loss_gradient_norms

    batch = model.collator()(load_records(depth_data / "train.jsonl")[:3])
    params = [p for p in model.parameters() if p.requires_grad]
    config = model.method.config

    def norms(weight):
        config.contrastive_weight = weight
        torch.manual_seed(0)  # the diffusion loss draws its noise and steps
        model.method.queue = None  # the same (empty) queue of past negatives
        return loss_gradient_norms(model, batch)

    try:
        tenth, half = norms(0.1), norms(0.5)  # the Trainer's backward below runs at 0.5
        torch.manual_seed(0)
        model.method.queue = None
        model.train()
        model.zero_grad()
        model(batch).loss.backward()
        trainer_norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
    finally:
        config.contrastive_weight = 0.5
        model.zero_grad()
        model.eval()
    assert set(half) == {"ce", "contrastive", "diffusion", "total"}
    assert half["total"] == pytest.approx(trainer_norm, rel=1e-4)
    assert tenth["contrastive"] == pytest.approx(half["contrastive"] / 5, rel=1e-4)
    assert tenth["ce"] == pytest.approx(half["ce"], rel=1e-4)
    assert half["total"] <= half["ce"] + half["contrastive"] + half["diffusion"] + 1e-6
    model.zero_grad(set_to_none=True)
    loss_gradient_norms(model, batch)
    assert all(p.grad is None for p in params)


def test_cached_fill_equals_the_multipass_unroll(model, tmp_path):
    """Two segments per row: the KV-cached chunked fill and the gradient-checkpointing unroll give the same losses."""
    from vlatent.testing import tiny_image

    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for i, path in enumerate(paths):
        tiny_image(i).save(path)
    record = {"id": "two", "images": paths, "messages": [
        {"role": "user", "content": [{"type": "image", "image": 0}, {"type": "text", "text": "Where?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "First"}, {"type": "latent", "image": 1},
                                          {"type": "text", "text": " then"}, {"type": "latent", "image": 2},
                                          {"type": "text", "text": " done."}]}]}
    batch = model.collator()([record, {**record, "id": "two-b"}])
    model.train()
    try:
        torch.manual_seed(0)
        model.method.queue = None  # both passes see the same (empty) queue of past negatives
        cached = model(batch).losses
        model.backbone.model.gradient_checkpointing_enable()
        torch.manual_seed(0)
        model.method.queue = None
        unrolled = model(batch).losses
    finally:
        model.backbone.model.gradient_checkpointing_disable()
        model.eval()
    for name in cached:
        torch.testing.assert_close(unrolled[name], cached[name], atol=1e-5, rtol=1e-4, msg=name)


def test_training_latents_are_the_ones_generation_feeds_back(model, depth_data):
    """The recurrent training pass and the KV-cached generation loop make the same K thoughts from the same prefix."""
    record = load_records(depth_data / "train.jsonl")[0]
    image, question = record["images"][0], record["messages"][0]["content"][1]["text"]
    record = {**record, "messages": [record["messages"][0], {"role": "assistant", "content": [
        {"type": "text", "text": "Go"}, {"type": "latent", "image": 1}, {"type": "text", "text": " done."}]}]}
    made = []
    hook = model.method.lq_former.register_forward_hook(lambda mod, args, out: made.append(out.latents.detach()))
    try:
        with torch.no_grad():
            model(model.collator()([record]))
        trained = torch.cat(made)
        made.clear()
        gen = model.generate([image], [question], max_new_tokens=5, prefix="Go<|latent_start|>")[0]
    finally:
        hook.remove()
    segment = gen.latent_segments[0]
    assert segment.latents.shape == (4, 64) and segment.features.shape == (4, 32)
    torch.testing.assert_close(segment.latents, trained, atol=1e-4, rtol=1e-4)


def test_similarity_maps_and_reconstruction(model, depth_data):
    record = load_records(depth_data / "train.jsonl")[1]
    gen = model.generate([record["images"][0]], ["Which point is closer?"], max_new_tokens=6,
                         prefix="<|latent_start|>")[0]
    segments = gen.latent_segments
    maps = model.method.similarity_maps(model, record["images"][0], segments)
    assert len(maps) == 1 and maps[0].size == (160, 160) and maps[0].mode == "RGB"
    images = model.method.reconstruct(torch.stack([s.features for s in segments]), steps=4,
                                      generator=torch.Generator().manual_seed(0))
    assert len(images) == 1 and images[0].size == (16, 16)
    with pytest.raises(ValueError, match="needs the generation context"):
        model.method.next_latent(torch.zeros(1, 64))


def test_one_seed_one_run(tmp_path, tiny_base, depth_data):
    """The LQ-Former and the UNet are built after train/sft.py seeds: two runs with one seed match."""
    cfg = recipe(tmp_path, model=str(tiny_base), method="cocova", method_config=TINY,
                 data={"train": str(depth_data / "train.jsonl"), "max_length": 1024},
                 training={"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "max_steps": 2,
                           "learning_rate": 1e-3, "logging_steps": 1, "seed": 0, "disable_tqdm": True})
    check_seeding(tmp_path, cfg, is_new=lambda name: name.startswith("method."))


@pytest.mark.slow
def test_deepspeed_overfits_16_records(tmp_path, tiny_base, depth_data):
    """Single-process DeepSpeed (ZeRO-2, CPU): LM + contrastive + diffusion losses on 16 depth records."""
    cfg = tmp_path / "cocova.yaml"
    cfg.write_text(yaml.safe_dump({
        # no queue: its negatives grow from none to every record's over the first steps, which raises InfoNCE's
        # chance level, so a first-vs-last comparison would not measure learning (the queue: test_cocova_contrastive)
        "model": str(tiny_base), "method": "cocova", "method_config": {**TINY, "contrastive_queue": 0},
        "data": {"train": str(depth_data / "train.jsonl"), "max_length": 1024},
        "deepspeed": str(ROOT / "train" / "ds_configs" / "zero2.json"),
        "training": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                     "max_steps": 40, "lr_scheduler_type": "constant", "logging_steps": 8, "seed": 0,
                     "disable_tqdm": True}}))
    finish(launch(str(cfg), 1))  # torchrun, one DeepSpeed process
    logs = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    first, last = logs[0], logs[-1]
    assert last["loss"] < 0.6 * first["loss"], logs
    assert last["loss_ce"] < first["loss_ce"] and last["loss_contrastive"] < first["loss_contrastive"], logs

    trained = LatentVLM.from_pretrained(tmp_path / "out").eval()
    assert trained.method.config.lq_hidden_size == 32
    record = load_records(depth_data / "train.jsonl")[0]
    gen = trained.generate([record["images"][0]], [record["messages"][0]["content"][1]["text"]], max_new_tokens=20,
                           prefix="Let me estimate the depth map of the scene.<|latent_start|>")[0]
    assert len(gen.latent_segments) == 1 and gen.latent_segments[0].features.shape == (4, 32), gen.text
    assert trained.method.similarity_maps(trained, record["images"][0], gen.latent_segments)[0].size == (160, 160)


@pytest.mark.parametrize("name", ["cocova.yaml", "tiny/cocova.yaml"])
def test_recipes_parse(name):
    from vlatent.training import load_recipe

    recipe = load_recipe(ROOT / "train" / "recipes" / name)
    assert recipe.method == "cocova" and recipe.method_config["num_latent_tokens"] >= 1
