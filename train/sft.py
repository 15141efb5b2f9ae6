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
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainingArguments, enable_full_determinism, set_seed

from vlatent.data import RecordError, load_records
from vlatent.model import LatentVLM
from vlatent.training import (LatentTrainer, LoraSettings, apply_freezing, apply_lora, load_deepspeed_config,
                              load_recipe, parameter_counts, plot_losses)
from vlatent.training.lora import row_masked
from vlatent.training.trainer import (MANIFEST, STAGING, CheckpointError, NonFiniteError, checkpoints,
                                      verify_checkpoint)


def parse_args(argv, prog="vlatent train sft", description="SFT of a LatentVLM from a YAML recipe."):
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", required=True,
                    help="a YAML recipe: a file, or a shipped recipe's name (mirage_stage1, tiny/mirage_stage1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe entry, e.g. training.learning_rate=1e-5 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output_dir")
    ap.add_argument("--allow-outside", action="append", default=[], metavar="PATH",
                    help="let records read images from this folder too (repeatable); by default a record's images "
                         "must lie in its dataset's folder")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    return ap.parse_args(argv)


def run_info(recipe, world_size: int) -> dict:
    """What a checkpoint records about its run, and what ``--resume`` must find unchanged (the recipe but its
    output_dir, so that a moved run folder resumes)."""
    resolved = json.loads(json.dumps(recipe.to_dict(), default=str))
    resolved["training"].pop("output_dir", None)
    return {"world_size": world_size, "recipe": resolved}


def prepare_output(out: Path, resume: bool, overwrite: bool, recipe, world_size: int, rank: int = 0) -> str | None:
    """Refuse to clobber a previous run (``--overwrite`` clears its checkpoints); on --resume return its last
    complete checkpoint once it is verified against its manifest and found to be of this recipe and world size."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {str(out)!r} is a file, not a folder")
    if resume:
        last = resumable_checkpoint(out, run_info(recipe, world_size))
        check_writable(out)
        return last
    check_writable(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output_dir {str(out)!r} is not empty: pass --overwrite to replace it or --resume")
        if rank == 0:  # the old run's checkpoints must not be resumed into this one
            for old in [*checkpoints(out), out / STAGING]:
                shutil.rmtree(old, ignore_errors=True)
    return None


def check_writable(out: Path) -> None:
    """Write a probe file in ``out`` (or its nearest existing parent, creating nothing) now, not at the first
    checkpoint after the training it holds."""
    folder = out
    while not folder.exists():
        folder = folder.parent
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"output_dir {str(out)!r} cannot be written: {e.strerror or e}") from None


def resumable_checkpoint(out: Path, info: dict) -> str:
    """The newest complete checkpoint of ``out``, verified; incomplete ones are skipped with a message."""
    if (out / STAGING).exists():
        print(f"--resume: ignoring {str(out / STAGING)!r}, a save that was interrupted (it is rewritten on the next "
              "save)", file=sys.stderr)
    for folder in reversed(checkpoints(out) if out.is_dir() else []):
        if not (folder / MANIFEST).is_file():
            print(f"--resume: ignoring {str(folder)!r}: it has no {MANIFEST}, a save that was interrupted; delete it",
                  file=sys.stderr)
            continue
        manifest = verify_checkpoint(folder)
        changed = changed_keys(manifest.get("recipe", {}), info["recipe"])
        if changed:
            raise CheckpointError(f"--resume: {str(folder)!r} was trained with another recipe ({'; '.join(changed)}): "
                                  "resume with the recipe it was started with, or start over with --overwrite")
        if manifest.get("world_size") != info["world_size"]:
            started = manifest.get("world_size")
            raise CheckpointError(f"--resume: {str(out)!r} was trained with {started} processes, this launch has "
                                  f"{info['world_size']}; ZeRO checkpoints are partitioned per process, relaunch with "
                                  f"{started}")
        return str(folder)
    raise FileNotFoundError(f"--resume: no checkpoint-* directory in {str(out)!r}"
                            + (" is complete" if out.is_dir() and checkpoints(out) else ""))


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each dotted recipe key whose value differs."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def check_lengths(collator, records: list[dict]) -> list[dict]:
    """Tokenise every record once up front, so an over-long one stops the run before the first step; says how many
    records had their images shrunk to ``data.image_token_budget`` and how many were skipped."""
    if collator.image_token_budget is not None:
        shrunk = sum(collator.budget_sizes(r) is not None for r in records)
        print(f"shrank the images of {shrunk} of {len(records)} record(s) to "
              f"data.image_token_budget={collator.image_token_budget} image tokens")
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
                            recipe.freeze_language_model, recipe.freeze_embed_tokens, recipe.freeze_projector_norm)
    if recipe.lora is not None:
        n_layers = apply_lora(model, LoraSettings.from_dict(recipe.lora))
        counts = parameter_counts(model)
        if rank == 0:
            print(f"LoRA on {n_layers} linear layers of the language model (merged into the weights on save)")
    return model, counts


def training_arguments(recipe, model=None) -> TrainingArguments:
    """The recipe's TrainingArguments; ``model`` (the one to train) says whether param groups are needed."""
    if recipe.deepspeed:
        single_process_env()
    training = {"logging_steps": 1, "save_strategy": "no",
                "use_cpu": not torch.cuda.is_available(),  # no GPU: accelerate's multi-CPU (gloo) path
                **recipe.training}
    deepspeed = recipe.deepspeed
    grouped = getattr(recipe, "multi_modal_projector_lr", None) is not None or bool(
        model is not None and training.get("weight_decay") and any(row_masked(p) for p in model.parameters()))
    if deepspeed and grouped:
        # DeepSpeed's own optimizer takes one flat parameter list, one learning rate and weight decay for all: drop
        # it, so the Trainer builds the param groups (the projector's learning rate; no decay on an embedding matrix
        # whose gradient is masked to the added tokens' rows, or its frozen rows would shrink)
        deepspeed = {k: v for k, v in load_deepspeed_config(deepspeed).items() if k != "optimizer"}
    return TrainingArguments(**training, deepspeed=deepspeed, remove_unused_columns=False)


def run(trainer, out: Path, recipe, world_size: int, last: str | None, title: str) -> int:
    """Train (or resume), then save the model with the resolved recipe, the log history and the loss curves beside it.
    Returns the exit status: 1 when training stopped on a non-finite value (no final model saved), else 0."""
    trainer.run_info = run_info(recipe, world_size)  # into every checkpoint's manifest, checked by --resume
    status = 0
    try:
        trainer.train(resume_from_checkpoint=last)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    else:
        trainer.save_model(str(out))
        if trainer.is_world_process_zero():
            recipe.save(out / "recipe.yaml")  # overrides applied, paths resolved
            (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
            plot_losses(trainer.state.log_history, out / "loss_curve.png", title=title)
            print(f"saved {out}")
    if torch.distributed.is_initialized():  # a rank that exits with gloo's threads alive aborts ("terminate called")
        if status == 0:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return status


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
        last = prepare_output(out, args.resume, args.overwrite, recipe, world_size, rank)
        train_records = load_records(recipe.data.train, allow_outside=args.allow_outside)
        if not train_records:
            raise ValueError(f"data.train {recipe.data.train!r} holds no records")
        eval_records = load_records(recipe.data.eval, allow_outside=args.allow_outside) if recipe.data.eval else None
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    seed = seed_run(recipe)  # before load_model: the method's new modules are initialised from the RNG
    model, counts = load_model(recipe, rank)
    collator = model.collator(max_length=recipe.data.max_length, on_overflow=recipe.data.on_overflow,
                              min_pixels=recipe.data.min_pixels, max_pixels=recipe.data.max_pixels,
                              image_token_budget=recipe.data.image_token_budget)
    try:
        train_records = check_lengths(collator, train_records)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"{model.method.name} stage {model.method.config.stage}: {len(train_records)} records, "
              f"{counts['trainable'] / 1e6:.2f}M trainable / {counts['frozen'] / 1e6:.2f}M frozen parameters")

    train_data, sampler = model.method.training_data(train_records, seed=seed)  # the records, or views + schedule
    trainer = LatentTrainer(model=model, args=training_arguments(recipe, model), train_dataset=train_data,
                            eval_dataset=eval_records, data_collator=collator, train_sampler=sampler,
                            projector_lr=recipe.multi_modal_projector_lr)
    return run(trainer, out, recipe, world_size, last, title=f"{model.method.name} SFT")


if __name__ == "__main__":
    sys.exit(main())
