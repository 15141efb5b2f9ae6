"""Recipes: found by name or path, paths resolved against the recipe file, every value type- and range-checked
before anything loads, and the resolved recipe (overrides included) is what a run saves."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from vlatent.training import load_recipe

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "method": "mirage", "data": {"train": "data/train.jsonl"},
        "training": {"output_dir": "runs/x"}}


def write(folder: Path, text: str, name="r.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def test_yaml_1_1_spellings_read_as_the_fields_want(tmp_path):
    """``1e-5`` is a number (YAML 1.1 reads a string), ``no`` stays the save strategy's name (YAML 1.1: false),
    ``off`` is false for a boolean field; ``--set`` values read the same way."""
    cfg = write(tmp_path, "model: m\nmethod: mirage\ndata: {train: t.jsonl}\ntraining:\n  output_dir: o\n"
                          "  learning_rate: 1e-5\n  save_strategy: no\n  bf16: off\n  warmup_steps: 2\n")
    r = load_recipe(cfg)
    assert r.training["learning_rate"] == 0.00001 and r.training["save_strategy"] == "no"
    assert r.training["bf16"] is False and r.training["warmup_steps"] == 2
    r = load_recipe(cfg, ["training.learning_rate=3e-4", "training.save_strategy=no", "training.max_steps=8"])
    assert r.training["learning_rate"] == 0.0003 and r.training["save_strategy"] == "no" and r.training["max_steps"] == 8


@pytest.mark.parametrize("override, match", [
    ("training.max_steps=abc", "training: max_steps must be an integer, got 'abc'"),
    ("training.save_strategy=off", "save_strategy must be one of 'no', 'steps', 'epoch', 'best', got 'off'"),
    ("training.learning_rate=0", r"training.learning_rate must be > 0, got 0"),
    ("training.learning_rate=.nan", "learning_rate must be a finite number"),
    ("training.per_device_train_batch_size=0", "per_device_train_batch_size must be >= 1, got 0"),
    ("training.gradient_accumulation_steps=1.5", "gradient_accumulation_steps must be an integer"),
    ("method_config.num_latent_tokens=0", "num_latent_tokens must be >= 1, got 0"),
    ("method_config.stage=3", r"method_config.stage must be one of \[1, 2\] for mirage, got 3"),
    ("method_config.ce_weight=heavy", "ce_weight must be a number, got 'heavy'"),
    ("training.learning_rat=1", "did you mean 'learning_rate' for 'learning_rat'"),
    ("method_config.num_latent_token=2", "did you mean 'num_latent_tokens'"),
    ("data.max_lenght=10", "did you mean 'max_length'"),
    ("data.image_token_budget=0", "data.image_token_budget must be >= 1, got 0"),
    ("freeze_vision=true", "did you mean 'freeze_vision_tower'"),
    ("freeze_vision_tower=maybe", "freeze_vision_tower must be true or false, got 'maybe'"),
    ("lora.r=two", "lora: r must be an integer, got 'two'"),
    ("data=3", "data must be a mapping, got 3"),
    ("training=", "training.output_dir is required"),  # an empty section reads as null
])
def test_bad_values_are_named_before_anything_loads(tmp_path, override, match):
    cfg = write(tmp_path, yaml.safe_dump(GOOD))  # the model is a hub id: nothing could load it offline anyway
    with pytest.raises(ValueError, match=match):
        load_recipe(cfg, [override])


def test_stage_is_checked_against_a_checkpoints_method(tmp_path):
    """A recipe that continues from a checkpoint names no method: the checkpoint's own (here text, one stage) is
    what the stage is checked against."""
    from vlatent.testing import build_tiny_model

    ckpt = build_tiny_model(tmp_path / "ckpt", method="text")
    cfg = write(tmp_path, yaml.safe_dump({**GOOD, "model": str(ckpt), "method": None}))
    assert load_recipe(cfg, ["method_config.stage=1"]).model == str(ckpt)
    with pytest.raises(ValueError, match=r"stage must be one of \[1\] for text, got 2"):
        load_recipe(cfg, ["method_config.stage=2"])


def test_paths_resolve_against_the_recipe_file_and_overrides_against_the_current_folder(tmp_path, monkeypatch):
    folder = tmp_path / "experiments" / "a"
    write(folder / "ds", '{"train_micro_batch_size_per_gpu": "auto"}', "mine.json")
    (folder / "prev").mkdir()
    cfg = write(folder, yaml.safe_dump({**GOOD, "model": "prev", "deepspeed": "ds/mine.json",
                                        "data": {"train": "data/train.jsonl", "eval": "../shared/val.jsonl"}}))
    monkeypatch.chdir(tmp_path)
    r = load_recipe(cfg)
    assert r.model == str(folder / "prev") and r.deepspeed == str(folder / "ds" / "mine.json")
    assert r.data.train == str(folder / "data" / "train.jsonl")
    assert r.data.eval == str(tmp_path / "experiments" / "shared" / "val.jsonl")
    assert r.training["output_dir"] == str(folder / "runs" / "x")
    assert r.method == "mirage" and r.source == str(cfg)
    r = load_recipe(cfg, ["data.train=mine.jsonl", "training.output_dir=out", "deepspeed=zero3"])
    assert r.data.train == str(tmp_path / "mine.jsonl") and r.training["output_dir"] == str(tmp_path / "out")
    assert r.deepspeed == str(ROOT / "train" / "ds_configs" / "zero3.json")  # a shipped config, by name


def test_shipped_recipes_by_name_from_any_folder(tmp_path, monkeypatch):
    """A shipped recipe names the user's data and runs (relative to the current folder) and vlatent's own files
    (the shipped tiny base, the DeepSpeed configs) wherever vlatent is."""
    monkeypatch.chdir(tmp_path)
    r = load_recipe("tiny/mirage_stage1")
    assert r.source == str(ROOT / "train" / "recipes" / "tiny" / "mirage_stage1.yaml")
    assert r.model == str(ROOT / "vlatent" / "assets" / "tiny_base")
    assert r.deepspeed == str(ROOT / "train" / "ds_configs" / "zero2.json")
    assert r.data.train == str(tmp_path / "runs" / "quickstart" / "data" / "train.jsonl")
    assert load_recipe("mirage_stage1.yaml").model == "Qwen/Qwen2.5-VL-7B-Instruct"  # a hub id stays one
    assert load_recipe("train/recipes/mirage_stage1.yaml").source == str(ROOT / "train/recipes/mirage_stage1.yaml")
    with pytest.raises(FileNotFoundError, match=r"recipe 'mirage_stage9' does not exist .* mirage_stage1, "):
        load_recipe("mirage_stage9")
    with pytest.raises(FileNotFoundError, match="DeepSpeed config 'zero9' does not exist .*zero2, zero3"):
        load_recipe("mirage_stage1", ["deepspeed=zero9"])


def test_monet_recipes_take_the_released_image_token_budgets_and_labels(tmp_path, monkeypatch):
    """Monet's per-sequence image budgets (src/utils.py:48-50, 299-302): 2000 / 1500 / 2000 tokens for stages 1-3."""
    monkeypatch.chdir(tmp_path)
    recipes = [load_recipe(f"monet_stage{s}") for s in (1, 2, 3)]
    assert [r.data.image_token_budget for r in recipes] == [2000, 1500, 2000]
    assert [r.method_config["supervise_tags"] for r in recipes] == [False] * 3  # the released labels


def test_perception_depth_recipe_takes_the_released_learning_rates_and_embeddings(tmp_path, monkeypatch):
    """Aurora (finetune_task_lora_depth_annealing.sh, train.py:980-990): LoRA at 2e-4, projector at 2e-5 and trainable,
    embed_tokens / lm_head fully trainable; a projector rate on a frozen projector, or with frozen embeddings, is
    refused."""
    monkeypatch.chdir(tmp_path)
    r = load_recipe("perception_depth")
    assert (r.training["learning_rate"], r.multi_modal_projector_lr) == (2e-4, 2e-5)
    assert not r.freeze_multi_modal_projector
    assert r.lora["train_embeddings"] is True
    with pytest.raises(ValueError, match="multi_modal_projector_lr must be > 0, got 0"):
        load_recipe("perception_depth", ["multi_modal_projector_lr=0"])
    with pytest.raises(ValueError, match="freeze_multi_modal_projector is true"):
        load_recipe("perception_depth", ["freeze_multi_modal_projector=true"])
    with pytest.raises(ValueError, match="lora.train_embeddings trains the whole embed_tokens"):
        load_recipe("perception_depth", ["freeze_embed_tokens=true"])


def test_saved_recipe_is_the_resolved_one(tmp_path, monkeypatch):
    """What a run folder keeps: overrides applied and paths absolute, so it reruns from any folder as it ran."""
    monkeypatch.chdir(tmp_path)
    r = load_recipe("tiny/mirage_stage1", ["training.max_steps=8", "data.train=d/train.jsonl"])
    r.save(tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert saved["training"]["max_steps"] == 8 and saved["training"]["learning_rate"] == 1.0e-3
    assert saved["data"]["train"] == str(tmp_path / "d" / "train.jsonl")
    monkeypatch.chdir(ROOT)
    again = load_recipe(tmp_path / "saved.yaml")
    assert again.data.train == str(tmp_path / "d" / "train.jsonl") and again.training["max_steps"] == 8


@pytest.mark.parametrize("attn, dtype", [("eager", "bfloat16"), ("sdpa", "float32")])
def test_attention_and_dtype_come_from_the_recipe(tmp_path, tiny_base, attn, dtype):
    sys.path.insert(0, str(ROOT))
    from train.sft import load_model

    cfg = write(tmp_path, yaml.safe_dump({**GOOD, "model": str(tiny_base), "method": "text",
                                          "attn_implementation": attn, "dtype": dtype}))
    model, _ = load_model(load_recipe(cfg), rank=0)
    assert model.backbone.model.config._attn_implementation == attn
    assert model.dtype == getattr(torch, dtype)


def test_report_to_names_a_known_installed_logger_before_anything_loads(tmp_path):
    """A misspelt logger gets the nearest name; one that is not installed names the extra to install (the Trainer
    would fail only when it builds its callbacks, after the model has loaded); "none" and "all" pass."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    cfg = write(tmp_path, yaml.safe_dump(GOOD))
    with pytest.raises(ValueError, match="did you mean 'tensorboard' for 'tensorbord'"):
        load_recipe(cfg, ["training.report_to=tensorbord"])
    missing = [n for n in ("tensorboard", "wandb") if n not in get_available_reporting_integrations()]
    for name in missing:
        with pytest.raises(ValueError, match=rf"report_to names '{name}', which is not installed: pip install "
                                             rf"'vlatent\[{name}\]'"):
            load_recipe(cfg, [f"training.report_to=[none, {name}]"])
    for ok in ("none", "all", "[]"):
        load_recipe(cfg, [f"training.report_to={ok}"])
