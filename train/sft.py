"""Supervised fine-tuning of a LatentVLM from a YAML recipe, with DeepSpeed through the Trainer.

    python train/sft.py --config train/recipes/mirage_stage1.yaml [--set training.max_steps=100] [--resume]
    deepspeed --num_gpus 8 train/sft.py --config ...          (see train/scripts/ for nodes, torchrun, accelerate)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 train/sft.py --config ...      (no GPU: gloo)

Everything that can be wrong with the recipe, the data or the output directory is reported before any
weights load or any step runs. The final model goes to training.output_dir (LatentVLM.save_pretrained),
with the recipe, the log history and the loss curves beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainingArguments, enable_full_determinism, set_seed
from transformers.trainer_utils import get_last_checkpoint

from vlatent.data import RecordError, load_records
from vlatent.model import LatentVLM
from vlatent.training import (LatentTrainer, LoraSettings, apply_freezing, apply_lora, load_recipe, parameter_counts,
                              plot_losses)

RUN_FILE = "vlatent_run.json"  # the world size a run was started with: resuming needs the same


def parse_args(argv, prog="vlatent train sft", description="SFT of a LatentVLM from a YAML recipe."):
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", required=True,
                    help="a YAML recipe: a file, or a shipped recipe's name (mirage_stage1, tiny/mirage_stage1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe entry, e.g. training.learning_rate=1e-5 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output_dir")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    return ap.parse_args(argv)


def prepare_output(out: Path, resume: bool, overwrite: bool, world_size: int) -> str | None:
    """Refuse to clobber a previous run; on --resume return its last checkpoint (same world size only)."""
    if resume:
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise FileNotFoundError(f"--resume: no checkpoint-* directory in {str(out)!r}")
        started = json.loads((out / RUN_FILE).read_text())["world_size"] if (out / RUN_FILE).is_file() else world_size
        if started != world_size:
            raise ValueError(f"--resume: {str(out)!r} was trained with {started} processes, this launch has "
                             f"{world_size}; ZeRO checkpoints are partitioned per process, relaunch with {started}")
        return last
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir {str(out)!r} is not empty: pass --overwrite to replace it or --resume")
    return None


def check_lengths(collator, records: list[dict]) -> list[dict]:
    """Tokenise every record once up front, so an over-long one stops the run before the first step."""
    if collator.max_length is None:
        return records
    kept = []
    for r in tqdm(records, desc="checking lengths", disable=int(os.environ.get("RANK", 0)) != 0):
        n = collator.length(r)
        if n <= collator.max_length:
            kept.append(r)
        elif collator.on_overflow == "error":
            raise RecordError(f"record {r['id']!r}: {n} tokens > max_length={collator.max_length} "
                              "(records are never truncated; raise data.max_length or set data.on_overflow: skip)")
    if len(kept) < len(records):
        print(f"skipped {len(records) - len(kept)} record(s) longer than max_length={collator.max_length}")
    return kept


def single_process_env() -> None:
    """A plain `python train/sft.py` with a DeepSpeed config is a world of one: say so, as a launcher would."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def seed_run(recipe) -> int:
    """Seed every RNG with the recipe's training.seed (TrainingArguments' default when unset) before the model is built.

    The Trainer seeds only when it is constructed, after ``load_model``: a method's new modules (CoCoVa's LQ-Former and
    UNet, perception's token embeddings, LoRA adapters) would otherwise start from whatever state the process's RNG
    is in, and two runs with one seed would differ. Returns the seed."""
    seed = recipe.training.get("seed", TrainingArguments.__dataclass_fields__["seed"].default)
    if recipe.training.get("full_determinism", False):
        enable_full_determinism(seed)
    else:
        set_seed(seed)
    return seed


def load_model(recipe, rank: int) -> tuple[LatentVLM, dict]:
    """The recipe's model with its freezing and LoRA applied; (model, parameter counts)."""
    model = LatentVLM.from_pretrained(recipe.model, method=recipe.method, dtype=recipe.dtype,
                                      attn_implementation=recipe.attn_implementation, **recipe.method_config)
    counts = apply_freezing(model, recipe.freeze_vision_tower, recipe.freeze_multi_modal_projector,
                            recipe.freeze_language_model)
    if recipe.lora is not None:
        n_layers = apply_lora(model, LoraSettings.from_dict(recipe.lora))
        counts = parameter_counts(model)
        if rank == 0:
            print(f"LoRA on {n_layers} linear layers of the language model (merged into the weights on save)")
    return model, counts


def training_arguments(recipe) -> TrainingArguments:
    if recipe.deepspeed:
        single_process_env()
    training = {"report_to": [], "logging_steps": 1, "save_strategy": "no",
                "use_cpu": not torch.cuda.is_available(),  # no GPU: accelerate's multi-CPU (gloo) path
                **recipe.training}
    return TrainingArguments(**training, deepspeed=recipe.deepspeed, remove_unused_columns=False)


def run(trainer, out: Path, recipe, world_size: int, last: str | None, title: str) -> None:
    """Train (or resume), then save the model with the resolved recipe, the log history and the loss curves beside it."""
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps({"world_size": world_size, "recipe": recipe.source}))
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        recipe.save(out / "recipe.yaml")  # overrides applied, paths resolved
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        plot_losses(trainer.state.log_history, out / "loss_curve.png", title=title)
        print(f"saved {out}")
    if torch.distributed.is_initialized():  # a rank that exits with gloo's threads alive aborts ("terminate called")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:
        recipe = load_recipe(args.config, args.set)
        if recipe.vlpo is not None:
            raise ValueError(f"recipe {args.config!r} has a 'vlpo:' section: it is an RL recipe, run it with "
                             "`vlatent train vlpo`")
        out = Path(recipe.training["output_dir"])
        last = prepare_output(out, args.resume, args.overwrite, world_size)
        train_records = load_records(recipe.data.train)
        eval_records = load_records(recipe.data.eval) if recipe.data.eval else None
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    seed_run(recipe)  # before load_model: the method's new modules are initialised from the RNG
    model, counts = load_model(recipe, rank)
    collator = model.collator(max_length=recipe.data.max_length, on_overflow=recipe.data.on_overflow,
                              min_pixels=recipe.data.min_pixels, max_pixels=recipe.data.max_pixels)
    try:
        train_records = check_lengths(collator, train_records)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"{model.method.name} stage {model.method.config.stage}: {len(train_records)} records, "
              f"{counts['trainable'] / 1e6:.2f}M trainable / {counts['frozen'] / 1e6:.2f}M frozen parameters")

    train_data, sampler = model.method.training_data(train_records)  # the records, or a method's views + schedule
    trainer = LatentTrainer(model=model, args=training_arguments(recipe), train_dataset=train_data,
                            eval_dataset=eval_records, data_collator=collator, train_sampler=sampler)
    run(trainer, out, recipe, world_size, last, title=f"{model.method.name} SFT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
