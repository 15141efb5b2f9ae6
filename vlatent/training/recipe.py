"""SFT recipes: YAML files that say what to train (model, method, stage, data, freezing, optimisation,
DeepSpeed). Parsed into a ``Recipe`` and checked completely (keys, types, ranges) before any weights load.

A recipe is found by path or by the name of a shipped one (``mirage_stage1``, ``tiny/mirage_stage1``); ``deepspeed``
by path or by name (``zero2``). Relative paths inside a recipe are relative to the recipe file; inside a shipped
recipe, and in ``--set`` overrides, to the current folder (they name the user's data and runs). The YAML is read as
YAML 1.2 reads it: ``1e-5`` is a number and ``no`` / ``off`` stay strings (``save_strategy: no``)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import TrainingArguments

from ..configs import check_keys, check_types
from ..methods import method_class
from ..shipped import DS_CONFIGS, RECIPES, find_file, is_shipped, locate
from .lora import LoraSettings


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans, and an exponent without a dot (``1e-5``) is a float."""


_Loader.yaml_implicit_resolvers = {c: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
                                   for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def read_yaml(text: str):
    """Parse recipe text (a file or a ``--set`` value) with the recipe's YAML 1.2 scalars."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class DataConfig:
    train: str = ""  # a records .jsonl (see vlatent.data)
    eval: str | None = None
    max_length: int | None = None  # records longer than this are refused (or skipped: on_overflow="skip")
    on_overflow: str = "error"
    min_pixels: int | None = None
    max_pixels: int | None = None
    image_token_budget: int | None = None  # a record's images shrunk together to at most this many tokens (Monet)


@dataclass
class Recipe:
    model: str = ""  # a base VLM (path or hub id) or a vlatent checkpoint (e.g. the previous stage's output)
    method: str | None = None  # required for a base model; a checkpoint knows its own
    method_config: dict = field(default_factory=dict)  # method config fields: stage, num_latent_tokens, weights...
    data: DataConfig = field(default_factory=DataConfig)
    freeze_vision_tower: bool = False
    freeze_multi_modal_projector: bool = False
    freeze_language_model: bool = False
    freeze_embed_tokens: bool = False  # the base vocabulary's input embeddings (added tokens' rows still learn)
    freeze_projector_norm: bool = False  # the projector's norm (Qwen: merger.ln_q), so only its MLP trains
    lora: dict | None = None  # LoRA on the language model (peft LoraConfig names: r, lora_alpha, ...); None = full
    multi_modal_projector_lr: float | None = None  # the projector's own learning rate (Aurora); None: training's
    dtype: str | None = None  # "bfloat16", "float16", "float32"; None keeps the checkpoint's
    attn_implementation: str | None = None  # "eager", "sdpa", "flash_attention_2", ...; None: transformers' choice
    deepspeed: str | None = None  # a DeepSpeed JSON: a path or a shipped name (zero2, zero3, zero3_offload)
    training: dict = field(default_factory=dict)  # transformers.TrainingArguments fields (output_dir, ...)
    vlpo: dict | None = None  # RL recipes only: VLPOConfig fields (vlatent.training.vlpo); checked by train/vlpo.py
    source: str = ""  # where the recipe came from, for messages

    def to_dict(self) -> dict:
        """The resolved recipe (overrides applied, paths absolute) as a mapping ``load_recipe`` reads back."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}

    def save(self, path: str | Path) -> None:
        """Write the resolved recipe (what a run folder keeps: the run can be repeated from it alone)."""
        Path(path).write_text(f"# resolved from {self.source}\n" + yaml.safe_dump(self.to_dict(), sort_keys=False))


# entries that name files or folders, resolved when the recipe is read (see the module docstring)
PATHS = ("data.train", "data.eval", "training.output_dir", "method_config.augment_decoder")
PATHS_OR_HUB_IDS = ("model", "method_config.teacher", "method_config.tokenizer")  # a path where one exists
# ranges beyond the field types: (test, what the value must be)
RANGES = {
    "training.learning_rate": (lambda v: v > 0, "> 0"),
    "training.per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "training.per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "training.gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "training.num_train_epochs": (lambda v: v > 0, "> 0"),
    "training.max_steps": (lambda v: v >= 1 or v == -1, ">= 1 (or -1: num_train_epochs decides)"),
    "training.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "training.weight_decay": (lambda v: v >= 0, ">= 0"),
    "training.logging_steps": (lambda v: v > 0, "> 0"),
    "training.save_steps": (lambda v: v > 0, "> 0"),
    "training.eval_steps": (lambda v: v is None or v > 0, "> 0"),
    "training.seed": (lambda v: v >= 0, ">= 0"),
    "method_config.num_latent_tokens": (lambda v: v >= 1, ">= 1"),
    "data.max_length": (lambda v: v is None or v >= 1, ">= 1"),
    "data.min_pixels": (lambda v: v is None or v >= 1, ">= 1"),
    "data.max_pixels": (lambda v: v is None or v >= 1, ">= 1"),
    "data.image_token_budget": (lambda v: v is None or v >= 1, ">= 1"),
}


def _get(tree: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Find a recipe (a path or a shipped name), apply ``key.sub=value`` overrides (values parsed as YAML), resolve
    its paths and check every key and value (type, range, known method and stage) before anything loads."""
    path = find_file(path, "recipe", RECIPES, ".yaml")
    where = repr(str(path))
    try:
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {where} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {where} must be a mapping of keys to values")
    overridden = set()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        try:
            _set(raw, key, read_yaml(value))
        except (yaml.YAMLError, AttributeError, TypeError) as e:
            raise ValueError(f"override {item!r}: {e}") from e
        overridden.add(key)
    check_keys(f"recipe {where}", raw, {f.name for f in dataclasses.fields(Recipe)} - {"source"})
    for section in ("data", "method_config", "training"):
        if raw.get(section, {}) is None:  # `training:` with nothing under it
            del raw[section]
        elif not isinstance(raw.get(section, {}), dict):
            raise ValueError(f"recipe {where}: {section} must be a mapping, got {raw[section]!r}")
    data = raw.pop("data", {})
    check_keys(f"recipe {where} data", data, {f.name for f in dataclasses.fields(DataConfig)})
    raw = check_types(f"recipe {where}", raw, Recipe)
    recipe = Recipe(**raw, data=DataConfig(**check_types(f"recipe {where} data", data, DataConfig)), source=str(path))
    _resolve_paths(recipe, Path.cwd() if is_shipped(path) else path.parent, overridden)
    _validate(recipe, where)
    return recipe


def _resolve_paths(r: Recipe, base: Path, overridden: set[str]) -> None:
    """Make the recipe's paths absolute: relative to ``base``, or to the current folder for ``--set`` values."""
    tree = {"model": r.model, "data": r.data.__dict__, "method_config": r.method_config, "training": r.training}
    for key in PATHS + PATHS_OR_HUB_IDS:
        value = _get(tree, key)
        if not isinstance(value, str) or not value:
            continue
        here = Path.cwd() if any(key == o or key.startswith(o + ".") for o in overridden) else base
        found = locate(value, here)
        if found is not None or key in PATHS:
            _set(tree, key, str(found or (here / Path(value).expanduser()).resolve()))
    r.model = tree["model"]
    if isinstance(r.deepspeed, str):
        here = Path.cwd() if "deepspeed" in overridden else base
        r.deepspeed = str(find_file(r.deepspeed, "DeepSpeed config", DS_CONFIGS, ".json", here))


def _method_name(r: Recipe) -> str | None:
    """The recipe's method, or the one a local checkpoint was saved with."""
    saved = Path(r.model) / "vlatent_config.json"
    return r.method or (json.loads(saved.read_text()).get("method") if saved.is_file() else None)


def _validate(r: Recipe, where: str) -> None:
    if not r.model:
        raise ValueError(f"recipe {where}: 'model' is required (a base VLM or a vlatent checkpoint)")
    if not r.data.train:
        raise ValueError(f"recipe {where}: 'data.train' is required")
    if r.data.on_overflow not in ("error", "skip"):
        raise ValueError(f"recipe {where}: data.on_overflow must be 'error' or 'skip', got {r.data.on_overflow!r}")
    if (name := _method_name(r)) is not None:
        cls = method_class(name)
        check_keys(f"recipe {where} method_config", r.method_config, {f.name for f in dataclasses.fields(cls.config_class)})
        r.method_config = check_types(f"recipe {where} method_config", r.method_config, cls.config_class)
        if "stage" in r.method_config and r.method_config["stage"] not in cls.stages:
            raise ValueError(f"recipe {where}: method_config.stage must be one of {list(cls.stages)} for {name}, "
                             f"got {r.method_config['stage']!r}")
    check_keys(f"recipe {where} training", r.training, {f.name for f in dataclasses.fields(TrainingArguments)})
    r.training = check_types(f"recipe {where} training", r.training, TrainingArguments)
    if "output_dir" not in r.training:
        raise ValueError(f"recipe {where}: training.output_dir is required")
    _check_report_to(r.training.get("report_to"), where)
    tree = {"data": r.data.__dict__, "method_config": r.method_config, "training": r.training}
    for key, (ok, what) in RANGES.items():
        value = _get(tree, key)
        if value is not None and not ok(value):
            raise ValueError(f"recipe {where}: {key} must be {what}, got {value!r}")
    if r.lora is not None:
        lora = LoraSettings.from_dict(r.lora, where=f"recipe {where} lora")
        if lora.train_embeddings and r.freeze_embed_tokens:
            raise ValueError(f"recipe {where}: lora.train_embeddings trains the whole embed_tokens, which "
                             "freeze_embed_tokens freezes (unset one)")
    if r.multi_modal_projector_lr is not None:
        if not r.multi_modal_projector_lr > 0:
            raise ValueError(f"recipe {where}: multi_modal_projector_lr must be > 0, "
                             f"got {r.multi_modal_projector_lr!r}")
        if r.freeze_multi_modal_projector:
            raise ValueError(f"recipe {where}: multi_modal_projector_lr is set but freeze_multi_modal_projector is "
                             "true: the projector would not train (unset one)")
    if r.dtype not in (None, "bfloat16", "float16", "float32"):
        raise ValueError(f"recipe {where}: dtype must be bfloat16, float16 or float32, got {r.dtype!r}")
    if r.deepspeed is not None:
        load_deepspeed_config(r.deepspeed)


def _check_report_to(report_to, where: str) -> None:
    """Each logger ``training.report_to`` names is one the Trainer knows and is installed (the Trainer itself
    only fails when it builds its callbacks, after the model has loaded)."""
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in (n for n in names if n not in ("all", "none")):
        if name not in INTEGRATION_TO_CALLBACK:
            check_keys(f"recipe {where} training.report_to", {name: None}, INTEGRATION_TO_CALLBACK)
        if name not in get_available_reporting_integrations():
            extra = f"'vlatent[{name}]'" if name in ("tensorboard", "wandb") else name
            raise ValueError(f"recipe {where}: training.report_to names {name!r}, which is not installed: "
                             f"pip install {extra}")


def load_deepspeed_config(path: str | Path) -> dict:
    """Parse a DeepSpeed JSON (a path or a shipped name), naming the file and the position of a syntax error."""
    path = find_file(path, "DeepSpeed config", DS_CONFIGS, ".json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {str(path)!r} does not parse: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config {str(path)!r} must be a JSON object")
    return config
