"""Perception tokens (Aurora): the depth VQ-VAE trained by its script, depth / box tokens in the collated text,
constrained decoding that always yields decodable segments, the curriculum sampler, config errors at build time,
and a DeepSpeed run that overfits 16 depth records and then generates a depth map."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vlatent.data import load_records
from vlatent.decoders import DepthTokenizer, load_decoder
from vlatent.generation import Generation, TextSegment
from vlatent.methods.perception import CurriculumSampler, PerceptionViews
from vlatent.model import LatentVLM
from vlatent.testing import tiny_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train.perception_tokenizer import main as train_tokenizer  # noqa: E402

from test_training import check_seeding, finish, launch, recipe, zero3_two_processes  # noqa: E402

N_CODES, CODEBOOK = 16, 16  # the test tokenizer: 32 px maps, 3 downsamplings -> 4 x 4 codes


def build(builder, out, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", f"data_builders.{builder}", "--out", str(out), "--seed", "0", *args],
                   check=True, env=env, capture_output=True)
    return out


@pytest.fixture(scope="module")
def depth_data(tmp_path_factory):
    """20 depth records from the real builder: 16 train, 2 val, 2 test."""
    return build("depth", tmp_path_factory.mktemp("depth") / "data", "--n", "20")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, depth_data):
    out = tmp_path_factory.mktemp("tok") / "depth_tokenizer"
    assert train_tokenizer(["--data", str(depth_data / "train.jsonl"), "--eval", str(depth_data / "val.jsonl"),
                            "--out", str(out), "--image-size", "32", "--channels", "8", "8", "8", "8",
                            "--latent-channels", "4", "--codebook-size", str(CODEBOOK), "--steps", "30",
                            "--batch-size", "8", "--restart-every", "10"]) == 0
    return out


@pytest.fixture(scope="module")
def model(tiny_base, tokenizer_dir):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_base, method="perception", tokenizer=str(tokenizer_dir),
                                     num_latent_tokens=N_CODES, codebook_size=CODEBOOK, box_bins=16, max_boxes=3).eval()


def test_tokenizer_script_trains_and_round_trips(tokenizer_dir, depth_data):
    metrics = json.loads((tokenizer_dir / "metrics.json").read_text())
    assert metrics["codes_per_map"] == N_CODES and metrics["heldout_maps"] == 2
    tok = load_decoder(tokenizer_dir)
    assert isinstance(tok, DepthTokenizer)
    maps = [Image.open(r["images"][1]) for r in load_records(depth_data / "val.jsonl")]
    codes = tok.encode(maps)
    assert codes.shape == (2, N_CODES) and codes.dtype == torch.long and int(codes.max()) < CODEBOOK
    images = tok.render(codes)
    # the reported error is the round trip's, and it beats a map of the training maps' mean depth (30 steps do not
    # beat the pixel-wise mean map: the builder's maps share one layout, MAE 5 of 255 around it)
    def pixels(im):
        return torch.tensor(list(im.convert("L").resize((32, 32), Image.BILINEAR).getdata()), dtype=torch.float)

    train_maps = [Image.open(r["images"][1]) for r in load_records(depth_data / "train.jsonl")]
    mean_depth = torch.stack([pixels(m) for m in train_maps]).mean()
    truth = torch.stack([pixels(m) for m in maps])
    round_trip = (torch.stack([pixels(im) for im in images]) - truth).abs().mean()
    assert abs(round_trip - metrics["mae"]) < 1.0, (round_trip, metrics["mae"])
    assert round_trip < 0.5 * (mean_depth - truth).abs().mean(), (round_trip, mean_depth)
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "L"
    assert tok.render([codes[0]])[0].tobytes() == images[0].tobytes()
    with pytest.raises(ValueError, match=f"must lie in \\[0, {CODEBOOK}\\)"):
        tok.render(codes + CODEBOOK)
    with pytest.raises(ValueError, match=f"must hold {N_CODES} codes"):
        tok.render([codes[0][:5]])


def test_tokenizer_script_refuses_bad_input(tmp_path, capsys):
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"id": "x", "messages": []}\n')
    assert train_tokenizer(["--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "record 'x'" in capsys.readouterr().err
    assert train_tokenizer(["--data", str(bad), "--out", str(tmp_path / "o"), "--image-size", "30"]) == 2
    assert "image_size=30 must be a positive multiple of 8" in capsys.readouterr().err


def test_bad_config_fails_at_build_time(tiny_base, tokenizer_dir):
    with pytest.raises(ValueError, match="writes 16 codes per map .* num_latent_tokens=100"):
        LatentVLM.from_pretrained(tiny_base, method="perception", tokenizer=str(tokenizer_dir))
    with pytest.raises(ValueError, match="codebook of 16, but .* codebook_size=32"):
        LatentVLM.from_pretrained(tiny_base, method="perception", tokenizer=str(tokenizer_dir),
                                  num_latent_tokens=N_CODES, codebook_size=32)
    with pytest.raises(ValueError, match="box_bins must be an integer >= 2"):
        LatentVLM.from_pretrained(tiny_base, method="perception", box_bins=1)
    with pytest.raises(FileNotFoundError, match="is not a depth tokenizer"):
        LatentVLM.from_pretrained(tiny_base, method="perception", tokenizer=str(tiny_base))


def test_collated_text_holds_depth_and_box_tokens(model, depth_data, tmp_path):
    record = load_records(depth_data / "train.jsonl")[0]
    cfg, tok = model.method.config, model.tokenizer
    batch = model.collator()([record])
    ids = batch["input_ids"][0].tolist()
    start = ids.index(cfg.depth_start_id)
    codes = ids[start + 1:start + 1 + N_CODES]
    assert ids[start + 1 + N_CODES] == cfg.depth_end_id
    expected = model.method.depth_tokenizer.encode([Image.open(record["images"][1])])[0]
    assert torch.equal(torch.tensor(codes) - cfg.depth_code_id, expected)
    assert batch["labels"][0, start:start + N_CODES + 2].tolist() == ids[start:start + N_CODES + 2]  # supervised
    assert tok.decode(ids[start:start + 2]).startswith("<DEPTH_START><DEPTH_")

    count = build("count", tmp_path / "count", "--n", "5", "--max-count", "3", "--max-objects", "8")
    record = load_records(count / "train.jsonl")[0]
    ids = model.collator()([record])["input_ids"][0].tolist()
    seg = ids[ids.index(cfg.box_start_id) + 1:ids.index(cfg.box_end_id)]
    assert len(seg) == 4 * len(record["meta"]["boxes"])
    boxes = model.method.parse_boxes(Generation([TextSegment(tok.decode(ids), ids)]), (192, 192))[0]
    assert (boxes - torch.tensor(record["meta"]["boxes"], dtype=torch.float32)).abs().max() <= 192 / 16 / 2 + 1


def test_training_loss_is_the_hf_models_own_next_token_ce(model, depth_data):
    """Perception trains plain next-token CE over text, depth and box tokens: the same number as the HF model's own
    ``loss`` for these labels (transformers shifts and masks -100 itself). Catches an unshifted CE, supervised prompt
    or padding positions, or a code segment whose labels were dropped."""
    batch = model.collator()(load_records(depth_data / "train.jsonl")[:3])
    hf = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
          if k in batch}
    with torch.no_grad():
        ours = model(batch).loss
        reference = model.backbone.model(**hf, labels=batch["labels"]).loss
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    cfg = model.method.config
    codes = (batch["labels"] >= cfg.depth_code_id) & (batch["labels"] < cfg.depth_code_id + cfg.codebook_size)
    assert int(codes.sum()) == 3 * N_CODES  # every depth code is a CE target


def test_constrained_decoding_always_yields_decodable_segments(model):
    cfg = model.method.config
    images = [tiny_image(0), tiny_image(1), None]
    prompts = ["Estimate the depth.", "Where are the circles?", "Hello"]
    prefix = ["<DEPTH_START>", "Let me look.<DEPTH_START><DEPTH_3><DEPTH_4>", "<BOX_START>"]
    gens = model.generate(images, prompts, max_new_tokens=N_CODES + 8, prefix=prefix, do_sample=True,
                          generator=torch.Generator().manual_seed(0))
    first = model.method.parse_segments(gens[0])
    assert len(first) == 1 and first[0].shape == (N_CODES,) and int(first[0].max()) < CODEBOOK
    ids = gens[1].segments[0].token_ids
    assert ids[N_CODES - 2] == cfg.depth_end_id  # the prefix's 2 codes count: N - 2 more, then the end token
    boxes = model.method.parse_boxes(gens[2], (56, 56))
    assert len(boxes) == 1 and 1 <= boxes[0].shape[0] <= cfg.max_boxes
    depth_map = model.method.depth_tokenizer.render(first)[0]
    assert depth_map.size == (32, 32)
    free = model.generate([None], ["Hello"], max_new_tokens=20, do_sample=True,
                          generator=torch.Generator().manual_seed(1))[0]
    ids = [t for s in free.segments for t in s.token_ids]
    assert not any(cfg.depth_code_id <= t < cfg.depth_code_id + CODEBOOK for t in ids)


def test_curriculum_anneals_from_perception_views_to_reasoning(model, depth_data):
    records = load_records(depth_data / "train.jsonl")
    data, sampler = model.method.training_data(records)
    assert sampler is None and data is records  # curriculum_epochs=0: the records as they are
    method = model.method
    method.config.curriculum_epochs = 2
    try:
        data, sampler = method.training_data(records)
    finally:
        method.config.curriculum_epochs = 0
    assert isinstance(data, PerceptionViews) and isinstance(sampler, CurriculumSampler) and len(sampler) == 16
    n = len(records)
    picks = {}
    for epoch in (0, 1, 2, 3):
        sampler.set_epoch(epoch)
        picks[epoch] = list(sampler)
        assert sorted(i % n for i in picks[epoch]) == list(range(n))
    assert all(i >= n for i in picks[0]) and all(i < n for i in picks[2] + picks[3])
    assert 0 < sum(i >= n for i in picks[1]) < n
    sampler.set_epoch(1)
    assert list(sampler) == picks[1]  # deterministic per epoch: every rank draws the same
    view = data[n]
    assert view["id"].endswith("#perception") and view["messages"][1]["content"] == [{"type": "latent", "image": 1}]
    assert view["messages"][0]["content"][-1]["text"] == method.config.depth_prompt


def test_curriculum_as_released_direct_answer_copies_and_the_1_to_0_1_schedule(model, depth_data):
    """Release (AiT/vae/create_depth_annealing_data.ipynb): 10 epochs, perception share 1.0, 0.9, ..., 0.1; the
    reasoning share half direct-answer copies, half chain of thought."""
    schedule = CurriculumSampler([True] * 4, epochs=9, start=0.0, end=0.9)
    shares = [round(1 - schedule.cot_share(e), 6) for e in range(10)]
    assert shares == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    n = 400
    has_direct = [True] * (n // 2) + [False] * (n // 2)
    sampler = CurriculumSampler([True] * n, epochs=1, start=1.0, end=1.0, has_direct=has_direct)
    picks = list(sampler)
    assert sorted(i % n for i in picks) == list(range(n)) and not any(n <= i < 2 * n for i in picks)
    direct = [i - 2 * n for i in picks if i >= 2 * n]
    assert all(i < n // 2 for i in direct) and 70 < len(direct) < 130  # about half of the 200 that have a copy
    records = load_records(depth_data / "train.jsonl")
    method = model.method
    method.config.curriculum_epochs, method.config.curriculum_direct_answer = 2, True
    try:
        data, sampler = method.training_data(records)
    finally:
        method.config.curriculum_epochs, method.config.curriculum_direct_answer = 0, False
    m = len(records)
    assert len(data) == 3 * m and sampler.has_direct.all()
    copy = data[2 * m]
    assert copy["id"] == records[0]["id"] + "#direct" and copy["messages"][0] == records[0]["messages"][0]
    assert copy["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": records[0]["answer"]}]}


def test_checkpoint_carries_its_tokenizer(model, tmp_path):
    out = model.save_pretrained(tmp_path / "ckpt")
    assert (out / "decoder" / "decoder_config.json").is_file()
    assert json.loads((out / "decoder" / "decoder_config.json").read_text())["type"] == "depth_vq"
    moved = tmp_path / "moved"
    out.rename(moved)
    loaded = LatentVLM.from_pretrained(moved)
    assert loaded.method.config.tokenizer == str(moved / "decoder")
    assert loaded.method.config.depth_code_id == model.method.config.depth_code_id


def test_one_seed_one_run(tmp_path, tiny_base, tokenizer_dir, depth_data):
    """The grown embeddings are built after train/sft.py seeds: two runs with one seed match."""
    cfg = recipe(tmp_path, model=str(tiny_base), method="perception",
                 method_config={"tokenizer": str(tokenizer_dir), "num_latent_tokens": N_CODES,
                                "codebook_size": CODEBOOK},
                 data={"train": str(depth_data / "train.jsonl"), "max_length": 1024},
                 training={"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "max_steps": 2,
                           "learning_rate": 1e-3, "logging_steps": 1, "seed": 0, "disable_tqdm": True})
    check_seeding(tmp_path, cfg, is_new=lambda name: name.endswith(("embed_tokens.weight", "lm_head.weight")))


@pytest.mark.slow
def test_deepspeed_overfits_16_depth_records_then_draws_a_depth_map(tmp_path, tiny_base, tokenizer_dir, depth_data):
    """Single-process DeepSpeed (ZeRO-2, CPU) with the curriculum: perception views first, then chain of thought."""
    cfg = tmp_path / "perception.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(tiny_base), "method": "perception",
        "method_config": {"tokenizer": str(tokenizer_dir), "num_latent_tokens": N_CODES, "codebook_size": CODEBOOK,
                          "curriculum_epochs": 2},
        "data": {"train": str(depth_data / "train.jsonl"), "max_length": 1024},
        "deepspeed": str(ROOT / "train" / "ds_configs" / "zero2.json"),
        "training": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                     "max_steps": 80, "lr_scheduler_type": "constant", "logging_steps": 8, "seed": 0,
                     "disable_tqdm": True}}))
    finish(launch(str(cfg), 1))  # torchrun, one DeepSpeed process
    logs = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    assert logs[-1]["loss"] < 0.6 * logs[0]["loss"], logs

    trained = LatentVLM.from_pretrained(tmp_path / "out").eval()
    record = load_records(depth_data / "train.jsonl")[0]
    question = record["messages"][0]["content"][1]["text"]
    gen = trained.generate([record["images"][0]], [question], max_new_tokens=N_CODES + 40,
                           prefix="Let me estimate the depth map of the scene.")[0]
    codes = trained.method.parse_segments(gen)
    assert codes and codes[0].shape == (N_CODES,)
    depth_map = load_decoder(tmp_path / "out" / "decoder").render(codes)[0]
    target = trained.method.depth_tokenizer.encode([Image.open(record["images"][1])])[0]
    assert (codes[0] == target).float().mean() > 0.5  # it learned this record's depth codes
    assert depth_map.size == (32, 32)


@pytest.mark.slow
def test_zero3_two_processes_train_lora_embeddings_and_the_projector_at_its_own_rate(tmp_path, tiny_base,
                                                                                     tokenizer_dir, depth_data):
    """train/recipes/perception_depth.yaml's LoRA (train_embeddings) and multi_modal_projector_lr under ZeRO-3 on
    two processes: the projector's param group keeps its rate through DeepSpeed's optimizer wrapping (Adam moves a
    weight at most ~lr a step, so two steps move the projector <= 2 x its rate, the embeddings ~100x more), the
    adapters are merged into the saved weights, the vision tower and the base language model stay as loaded."""
    lr, projector_lr = 1e-2, 1e-4
    after, before, _ = zero3_two_processes(
        tmp_path, tiny_base, "perception",
        {"tokenizer": str(tokenizer_dir), "num_latent_tokens": N_CODES, "codebook_size": CODEBOOK},
        depth_data / "train.jsonl", lora={"r": 8, "lora_alpha": 16, "train_embeddings": True},
        multi_modal_projector_lr=projector_lr, freeze_vision_tower=True, training={"learning_rate": lr})

    def change(k):
        return (after[k].float() - before[k].float()).abs().max().item()

    frozen = [k for k in before if (k.startswith("model.visual.") and ".merger." not in k) or "layernorm" in k
              or k == "model.language_model.norm.weight"]
    assert frozen and [k for k in frozen if change(k) > 0] == []
    projector = [k for k in before if ".merger." in k]
    assert projector and all(0 < change(k) <= 2.5 * projector_lr for k in projector), \
        {k: change(k) for k in projector}
    assert change("model.language_model.embed_tokens.weight") > 25 * projector_lr  # trained at lr
    assert change("lm_head.weight") > 25 * projector_lr
    assert change("model.language_model.layers.0.self_attn.q_proj.weight") > 0  # LoRA merged in


@pytest.mark.parametrize("name", ["perception_depth.yaml", "perception_count.yaml", "tiny/perception_depth.yaml"])
def test_recipes_parse(name):
    from vlatent.training import load_recipe

    recipe = load_recipe(ROOT / "train" / "recipes" / name)
    assert recipe.method == "perception" and recipe.method_config["curriculum_epochs"] >= 2
