"""SFT recipes: YAML files that say what to train (model, method, stage, data, freezing, optimisation,
DeepSpeed). Parsed into a ``Recipe`` and checked completely before any weights load."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import TrainingArguments

from ..configs import check_keys
from ..methods import method_class
from .lora import LoraSettings


@dataclass
class DataConfig:
    train: str = ""  # a records .jsonl (see vlatent.data)
    eval: str | None = None
    max_length: int | None = None  # records longer than this are refused (or skipped: on_overflow="skip")
    on_overflow: str = "error"
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass
class Recipe:
    model: str = ""  # a base VLM (path or hub id) or a vlatent checkpoint (e.g. the previous stage's output)
    method: str | None = None  # required for a base model; a checkpoint knows its own
    method_config: dict = field(default_factory=dict)  # method config fields: stage, num_latent_tokens, weights...
    data: DataConfig = field(default_factory=DataConfig)
    freeze_vision_tower: bool = False
    freeze_multi_modal_projector: bool = False
    freeze_language_model: bool = False
    lora: dict | None = None  # LoRA on the language model (peft LoraConfig names: r, lora_alpha, ...); None = full
    dtype: str | None = None  # "bfloat16", "float16", "float32"; None keeps the checkpoint's
    deepspeed: str | None = None  # a DeepSpeed JSON (train/ds_configs/*.json); None trains without DeepSpeed
    training: dict = field(default_factory=dict)  # transformers.TrainingArguments fields (output_dir, ...)
    vlpo: dict | None = None  # RL recipes only: VLPOConfig fields (vlatent.training.vlpo); checked by train/vlpo.py
    source: str = ""  # where the recipe came from, for messages


def _check_keys(where: str, given: dict, known: set[str]) -> None:
    check_keys(f"recipe {where}", given, known)


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``key.sub=value`` overrides (values parsed as YAML) and validate it all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {str(path)!r} must be a mapping of keys to values")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        _set(raw, key, yaml.safe_load(value))
    where = repr(str(path))
    top = {f.name for f in dataclasses.fields(Recipe)} - {"source"}
    _check_keys(where, raw, top)
    data = raw.pop("data", None) or {}
    _check_keys(f"{where} data", data, {f.name for f in dataclasses.fields(DataConfig)})
    recipe = Recipe(**raw, data=DataConfig(**data), source=str(path))
    _validate(recipe, where)
    return recipe


def _validate(r: Recipe, where: str) -> None:
    if not r.model:
        raise ValueError(f"recipe {where}: 'model' is required (a base VLM or a vlatent checkpoint)")
    if not r.data.train:
        raise ValueError(f"recipe {where}: 'data.train' is required")
    if r.data.on_overflow not in ("error", "skip"):
        raise ValueError(f"recipe {where}: data.on_overflow must be 'error' or 'skip', got {r.data.on_overflow!r}")
    if r.method is not None:
        fields = {f.name for f in dataclasses.fields(method_class(r.method).config_class)}
        _check_keys(f"{where} method_config", r.method_config, fields)
    _check_keys(f"{where} training", r.training, {f.name for f in dataclasses.fields(TrainingArguments)})
    if "output_dir" not in r.training:
        raise ValueError(f"recipe {where}: training.output_dir is required")
    if r.lora is not None:
        LoraSettings.from_dict(r.lora, where=f"recipe {where} lora")
    if r.dtype not in (None, "bfloat16", "float16", "float32"):
        raise ValueError(f"recipe {where}: dtype must be bfloat16, float16 or float32, got {r.dtype!r}")
    if r.deepspeed is not None:
        load_deepspeed_config(r.deepspeed)


def load_deepspeed_config(path: str | Path) -> dict:
    """Parse a DeepSpeed JSON, naming the file and the position of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {str(path)!r} does not parse: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config {str(path)!r} must be a JSON object")
    return config
