"""Evaluation throughput: examples/s of the eval runner (``eval.run.evaluate``) at batch 1, 4 and 16 on the tiny model.

    python bench/eval_throughput.py [--n 64 --max-new-tokens 32 --warmup 2 --repeats 3 --device cpu]

Runs the maze benchmark (a ``data_builders`` test split of ``--n`` examples, one image each, latent reasoning on) into a
fresh folder per batch size. "generation" counts the runner's batch loop (image decoding, ``LatentVLM.generate``,
judging: the rows' ``seconds``); "end to end" adds loading the data, scoring and writing the report and chart.
Each batch size first runs ``--warmup`` times untimed: on CPU the first forward at a new (batch, length) shape builds
its kernels (~1 ms per attention call at these widths, 80x a warm one), so a cold run measures kernel building; the
timed runs meet the same shapes warm, as a long evaluation mostly does. Target: batch 16 >= 5x batch 1. Prints a
markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the apps, from the checkout

from data_builders import maze  # noqa: E402
from eval.run import evaluate  # noqa: E402
from vlatent.model import LatentVLM  # noqa: E402
from vlatent.testing import build_tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="examples")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per batch size first")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the median is shown)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = LatentVLM.from_pretrained(build_tiny_model(tmp / "model")).to(args.device).eval()
        assert maze.main(["--out", str(tmp / "maze"), "--n", str(args.n), "--split", "0,0,1"]) == 0
        results = {}
        for b in map(int, args.batch_sizes.split(",")):
            runs = []
            for r in range(args.warmup + args.repeats):  # the first runs warm up (see the module docstring)
                out = tmp / f"b{b}-{r}"
                start = time.perf_counter()
                evaluate(model, "maze", tmp / "maze", out, batch_size=b, max_new_tokens=args.max_new_tokens,
                         progress=False)
                wall = time.perf_counter() - start
                rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
                tokens = sum(row["text_tokens"] + row["latent_tokens"] for row in rows) / len(rows)
                runs.append((len(rows) / sum(row["seconds"] for row in rows), len(rows) / wall, tokens))
            timed = sorted(runs[args.warmup:])
            results[b] = timed[len(timed) // 2]  # the median run by generation speed

    base = results[min(results)][0]
    print(f"maze, {args.n} examples, max_new_tokens {args.max_new_tokens}, latent on, device {args.device}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| batch | examples/s (generation) | vs batch 1 | examples/s (end to end) | tokens per example |")
    print("|---:|---:|---:|---:|---:|")
    for b, (gen, e2e, tokens) in results.items():
        print(f"| {b} | {gen:.1f} | {gen / base:.1f}x | {e2e:.1f} | {tokens:.1f} |")


if __name__ == "__main__":
    main()
