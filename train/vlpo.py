"""VLPO (RL over text and latent actions) of a LatentVLM from a YAML recipe, with DeepSpeed through the Trainer.

    python train/vlpo.py --config train/recipes/vlpo_monet.yaml [--set vlpo.beta=0.01] [--resume]
    vlatent train vlpo --config ...
    bash train/scripts/vlpo.sh train/recipes/vlpo_monet.yaml 8       (deepspeed on 8 GPUs; see the script)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 train/vlpo.py --config ...      (no GPU: gloo)

The recipe is an SFT recipe (model, data, freezing, lora, dtype, deepspeed, training) plus a ``vlpo:`` section
(``vlatent.training.vlpo.VLPOConfig``). Records are the usual ones: the prompt is every turn before the assistant's,
the reward reads ``answer`` and ``meta``. Everything is checked before any weights load.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the checkout's `train` package
from train.sft import load_model, parse_args, prepare_output, run, seed_run, training_arguments  # noqa: E402
from vlatent.data import load_records  # noqa: E402
from vlatent.training import VLPOConfig, VLPOTrainer, load_recipe  # noqa: E402


def check_recipe(recipe) -> VLPOConfig:
    """The ``vlpo:`` section, and the SFT-only data settings refused rather than ignored."""
    where = f"recipe {recipe.source!r}"
    if recipe.vlpo is None:
        raise ValueError(f"{where}: a VLPO recipe needs a 'vlpo:' section (VLPOConfig fields; `vlpo: {{}}` for the "
                         "defaults)")
    unused = [k for k in ("eval", "max_length", "image_token_budget") if getattr(recipe.data, k) is not None]
    if unused:
        raise ValueError(f"{where}: data.{unused[0]} is not used by VLPO (prompts come from data.train; "
                         "completions are bounded by vlpo.max_completion_length)")
    if recipe.multi_modal_projector_lr is not None:
        raise ValueError(f"{where}: multi_modal_projector_lr is SFT only (unset it; VLPO trains at "
                         "training.learning_rate)")
    return VLPOConfig.from_dict(recipe.vlpo, f"{where} vlpo")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv, prog="vlatent train vlpo",
                      description="VLPO (RL) of a LatentVLM from a YAML recipe (an SFT recipe plus a 'vlpo:' section).")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:
        recipe = load_recipe(args.config, args.set)
        config = check_recipe(recipe)
        out = Path(recipe.training["output_dir"])
        last = prepare_output(out, args.resume, args.overwrite, recipe, world_size, rank)
        records = load_records(recipe.data.train, allow_outside=args.allow_outside)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    seed_run(recipe)  # before load_model: the method's new modules are initialised from the RNG
    model, counts = load_model(recipe, rank)
    if recipe.data.min_pixels is not None or recipe.data.max_pixels is not None:  # bounds every image's token count
        size = model.processor.image_processor.size
        size.update({k: v for k, v in (("shortest_edge", recipe.data.min_pixels),
                                       ("longest_edge", recipe.data.max_pixels)) if v is not None})
    if rank == 0:
        variant = "VLPO (text + latent actions)" if config.score_latents else "text-only GRPO (latents masked)"
        print(f"{model.method.name} {variant}: {len(records)} prompts x {config.num_generations} rollouts, "
              f"{counts['trainable'] / 1e6:.2f}M trainable / {counts['frozen'] / 1e6:.2f}M frozen parameters")

    try:
        trainer = VLPOTrainer(model=model, args=training_arguments(recipe, model), vlpo=config, train_dataset=records)
    except ValueError as e:  # batch size vs num_generations, method vs score_latents
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(trainer, out, recipe, world_size, last, title=f"{model.method.name} VLPO")


if __name__ == "__main__":
    sys.exit(main())
