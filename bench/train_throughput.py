"""SFT step time and peak memory per method and stage against `text` SFT, same tiny model, same batch.

    python bench/train_throughput.py [--hidden 256 --layers 4 --batch 8 --steps 20]

Each arm runs in its own process (peak RSS is per process): forward + backward + AdamW step on one collated
batch of maze records. Target: latent methods within 1.3x of text SFT step time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = [("text", {}), ("mirage", {"stage": 1}), ("mirage", {"stage": 2})]


def run_arm(base: str, data: str, method: str, cfg: dict, batch: int, steps: int) -> dict:
    import torch

    from vlatent.data import load_records
    from vlatent.model import LatentVLM

    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(base, method=method, **cfg).train()
    records = load_records(data)[:batch]
    inputs = model.collator()(records)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        model(inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step = sorted(times[2:])[len(times[2:]) // 2]
    return {"step_s": step, "samples_per_s": batch / step, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": int(inputs["attention_mask"].sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = ap.parse_args()
    if args.arm:
        base, data, method, cfg = json.loads(args.arm)
        print(json.dumps(run_arm(base, data, method, cfg, args.batch, args.steps)))
        return

    from vlatent.testing import build_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        base = str(build_tiny_base(Path(tmp) / "base", hidden_size=args.hidden, num_hidden_layers=args.layers,
                                   intermediate_size=4 * args.hidden, num_attention_heads=args.hidden // 32,
                                   num_key_value_heads=max(1, args.hidden // 128)))
        subprocess.run([sys.executable, "-m", "data_builders.maze", "--out", f"{tmp}/maze", "--n", str(4 * args.batch),
                        "--size", "5", "--questions", "first_move", "--seed", "0"], check=True, cwd=ROOT,
                       capture_output=True)
        rows = {}
        for method, cfg in ARMS:
            arm = json.dumps([base, f"{tmp}/maze/train.jsonl", method, cfg])
            out = subprocess.run([sys.executable, __file__, "--arm", arm, "--batch", str(args.batch),
                                  "--steps", str(args.steps)], check=True, capture_output=True, text=True, cwd=ROOT)
            rows[f"{method}" + (f" stage {cfg['stage']}" if cfg else "")] = json.loads(out.stdout.strip().splitlines()[-1])
    text = rows["text"]["step_s"]
    print(f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} maze records (5x5, one latent segment "
          f"per straight run), median of {args.steps} steps")
    print("| arm | step | samples/s | vs text | peak RSS |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_s'] * 1e3:.0f} ms | {r['samples_per_s']:.1f} | {r['step_s'] / text:.2f}x | "
              f"{r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
