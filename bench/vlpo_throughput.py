"""VLPO throughput: rollouts/s and the training step split into generation (the decode loop), the rest of the
rollout phase (rewards, the batch, reference log-probs) and the update (objective forward + backward + optimizer step),
for VLPO, text-only GRPO and VLPO with a KL reference.

    python bench/vlpo_throughput.py [--hidden 256 --layers 4 --prompts 4 --generations 4 --completion 48 --steps 6]

One process, no DeepSpeed, the Trainer's own loop (``VLPOTrainer.train``): a tiny Mirage model (K = 4) on 5x5 maze
first-move questions, every rollout opened with a latent segment (``prefix``) and run to ``--completion`` steps
(an untrained model rarely stops early). Step times are medians over the steps after the first (warm-up); the
generation and rollout shares come from the trainer's own ``time/generation_s`` and ``time/rollout_s`` logs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = [("vlpo", {}), ("text-only GRPO", {"score_latents": False}), ("vlpo + KL", {"beta": 0.04})]


def run_arm(base: str, data: str, vlpo: dict, args) -> dict:
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from vlatent.data import load_records
    from vlatent.model import LatentVLM
    from vlatent.training import VLPOConfig, VLPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(base, method="mirage", num_latent_tokens=4)
    batch = args.prompts * args.generations
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=args.steps,
                                  learning_rate=1e-5, logging_steps=1, report_to=[], save_strategy="no",
                                  use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0)
        config = VLPOConfig(num_generations=args.generations, max_completion_length=args.completion,
                            prefix="<|latent_start|>", latent_sigma=0.5, reward_funcs=["accuracy", "format"], **vlpo)
        timer = StepTimer()
        trainer = VLPOTrainer(model=model, args=targs, vlpo=config, train_dataset=load_records(data),
                              callbacks=[timer])
        trainer.train()
    logs = [e for e in trainer.state.log_history if "time/generation_s" in e][1:]
    step = statistics.median(timer.times[1:])
    generation = statistics.median(e["time/generation_s"] for e in logs)
    rollout = statistics.median(e["time/rollout_s"] for e in logs)
    return {"step_s": step, "generation_s": generation, "rest_of_rollout_s": rollout - generation,
            "update_s": step - rollout,
            "rollouts_per_s": batch / step, "generation_rollouts_per_s": batch / generation,
            "steps_per_rollout": statistics.mean(e["completions/mean_length"] for e in logs),
            "latent_steps": statistics.mean(e["completions/latent_steps"] for e in logs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="rollouts per prompt (num_generations)")
    ap.add_argument("--completion", type=int, default=48, help="max_completion_length")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process, print JSON
    args = ap.parse_args()
    if args.arm:
        base, data, vlpo = json.loads(args.arm)
        print(json.dumps(run_arm(base, data, vlpo, args)))
        return

    from vlatent.testing import build_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        base = str(build_tiny_base(Path(tmp) / "base", hidden_size=args.hidden, num_hidden_layers=args.layers,
                                   intermediate_size=4 * args.hidden, num_attention_heads=args.hidden // 32,
                                   num_key_value_heads=max(1, args.hidden // 128)))
        n = args.prompts * args.steps
        subprocess.run([sys.executable, "-m", "data_builders.maze", "--out", f"{tmp}/maze", "--n", str(2 * n),
                        "--size", "5", "--questions", "first_move", "--seed", "0"], check=True, cwd=ROOT,
                       capture_output=True)
        rows = []
        for name, vlpo in ARMS:  # one process per arm
            arm = json.dumps([base, f"{tmp}/maze/train.jsonl", vlpo])
            cmd = [sys.executable, __file__, *sys.argv[1:], "--arm", arm]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise RuntimeError(f"arm {name} failed:\n{out.stderr[-3000:]}")
            rows.append((name, json.loads(out.stdout.strip().splitlines()[-1])))

    batch = args.prompts * args.generations
    print(f"hidden {args.hidden}, {args.layers} layers; {args.prompts} prompts x {args.generations} rollouts = {batch} "
          f"per step, up to {args.completion} steps each (K = 4 latents)\n")
    print("| arm | step | generation | rewards + batch + ref | update | rollouts/s (step) | rollouts/s (generation) "
          "| steps / rollout |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['step_s']:.2f} s | {r['generation_s']:.2f} s ({r['generation_s'] / r['step_s']:.0%}) | "
              f"{r['rest_of_rollout_s']:.2f} s | {r['update_s']:.2f} s ({r['update_s'] / r['step_s']:.0%}) | "
              f"{r['rollouts_per_s']:.1f} | {r['generation_rollouts_per_s']:.1f} | "
              f"{r['steps_per_rollout']:.1f} ({r['latent_steps']:.1f} latent) |")


if __name__ == "__main__":
    main()
