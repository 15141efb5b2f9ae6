"""SFT step time and peak memory per method and stage against `text` SFT, same tiny model, same batch; and
per-process parameter memory under DeepSpeed ZeRO-0 vs ZeRO-3 with 2 processes.

    python bench/train_throughput.py [--hidden 256 --layers 4 --batch 8 --steps 20] [--skip-zero]

Each arm runs in its own process (peak RSS is per process): forward + backward + AdamW step on one collated
batch of 5x5 maze records (the text after each latent segment marked as a Monet observation span). Monet's
stage-2/3 teachers are untrained copies of the same model: their cost, not their quality, is measured.
Target: latent methods within 1.3x of text SFT step time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# CoCoVa with the learning benchmark's small LQ-Former / UNet (its arm recipe's method_config)
COCOVA = yaml.safe_load((ROOT / "train/recipes/learning/cocova.yaml").read_text())["stages"][0]["method_config"]
ARMS = [("text", {}), ("mirage", {"stage": 1}), ("mirage", {"stage": 2}),
        ("monet", {"stage": 1}), ("monet", {"stage": 2}), ("monet", {"stage": 3}), ("cocova", COCOVA)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(base: str, teachers: str, method: str, cfg: dict):
    from vlatent.model import LatentVLM

    if method == "monet" and cfg["stage"] > 1:  # stage 2 learns from a stage-1 teacher, stage 3 from a stage-2 one
        cfg = {**cfg, "teacher": f"{teachers}/monet_stage{cfg['stage'] - 1}"}
    return LatentVLM.from_pretrained(base, method=method, **cfg)


def maze_batch(model, data: str, batch: int):
    from vlatent.data import load_records, present  # "observations": Monet's view, the text after a latent step

    return model.collator()(present(load_records(data)[:batch], "observations"))


def run_arm(base, data, teachers, method, cfg, batch, steps) -> dict:
    import torch

    torch.manual_seed(0)
    model = load_model(base, teachers, method, cfg).train()
    inputs = maze_batch(model, data, batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        model(inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step = sorted(times[2:])[len(times[2:]) // 2]
    return {"step_s": step, "samples_per_s": batch / step, "peak_rss_mb": peak_rss_mb(),
            "tokens": int(inputs["attention_mask"].sum())}


def run_zero_rank(base, data, stage, batch, steps) -> None:
    """One rank of a 2-process DeepSpeed run (launched by torchrun): parameter bytes this process holds."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from vlatent.model import LatentVLM

    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(base, method="mirage", stage=1).train()
    inputs = maze_batch(model, data, batch)
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config=config)
    # ZeRO-3 keeps only this rank's shard of each parameter (``ds_tensor``); the full tensor is gathered per forward
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.backward(engine(inputs).loss)
        engine.step()
    row = {"rank": dist.get_rank(), "param_mb": held / 2**20, "full_param_mb": full / 2**20,
           "step_s": (time.perf_counter() - t0) / steps, "peak_rss_mb": peak_rss_mb()}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print(json.dumps(rows))


def run_sub(cmd: list[str], env=None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-zero", action="store_true", help="only the per-method step times")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    ap.add_argument("--zero-rank", help=argparse.SUPPRESS)  # internal: one rank of the ZeRO comparison
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(run_arm(*json.loads(args.arm), args.batch, args.steps)))
        return
    if args.zero_rank:
        run_zero_rank(*json.loads(args.zero_rank), args.batch, args.steps)
        return

    from vlatent.model import LatentVLM
    from vlatent.testing import build_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        base = str(build_tiny_base(Path(tmp) / "base", hidden_size=args.hidden, num_hidden_layers=args.layers,
                                   intermediate_size=4 * args.hidden, num_attention_heads=args.hidden // 32,
                                   num_key_value_heads=max(1, args.hidden // 128)))
        for stage in (1, 2):
            LatentVLM.from_pretrained(base, method="monet", stage=stage).save_pretrained(f"{tmp}/monet_stage{stage}")
        subprocess.run([sys.executable, "-m", "data_builders.maze", "--out", f"{tmp}/maze", "--n", str(4 * args.batch),
                        "--size", "5", "--questions", "first_move", "--seed", "0"], check=True, cwd=ROOT,
                       capture_output=True)
        data = f"{tmp}/maze/train.jsonl"
        rows = {}
        for method, cfg in ARMS:
            arm = json.dumps([base, data, tmp, method, cfg])
            name = method + (f" stage {cfg['stage']}" if "stage" in cfg else "")
            rows[name] = json.loads(run_sub([sys.executable, __file__, "--arm", arm, "--batch", str(args.batch),
                                             "--steps", str(args.steps)]))
            print(f"  {name}: {rows[name]['step_s'] * 1e3:.0f} ms/step", file=sys.stderr)
        zero = {}
        if not args.skip_zero:
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
            for stage in (0, 3):
                zero[stage] = json.loads(run_sub(
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                     "--zero-rank", json.dumps([base, data, stage]), "--batch", "2", "--steps", "3"], env=env))

    text = rows["text"]["step_s"]
    print(f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} maze records (5x5), median of "
          f"{args.steps} steps, {os.cpu_count()} CPU cores")
    print("| arm | step | samples/s | vs text | peak RSS |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_s'] * 1e3:.0f} ms | {r['samples_per_s']:.1f} | {r['step_s'] / text:.2f}x | "
              f"{r['peak_rss_mb']:.0f} MB |")
    if zero:
        print("\nmirage stage 1, 2 processes (gloo), batch 2 per rank, 3 steps")
        print("| ZeRO stage | parameters held per process | of the full model | step | peak RSS (rank 0) |\n"
              "|---|---|---|---|---|")
        for stage, ranks in zero.items():
            r = ranks[0]
            held = ", ".join(f"{x['param_mb']:.1f} MB" for x in ranks)
            print(f"| {stage} | {held} | "
                  f"{r['param_mb'] / r['full_param_mb']:.0%} | {r['step_s'] * 1e3:.0f} ms | {r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
