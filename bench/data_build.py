"""Data build speed and memory: 10,000 maze examples at 8x8 on one core, and peak memory at 1,000 vs 10,000 examples.

    python bench/data_build.py [--n 10000 --size 8]

Targets: the 10,000 examples build in under a minute; peak memory stays flat as n grows (records and images stream to
disk). Each build runs as its own process pinned to one core, so its time and peak RSS are its own. Prints a markdown
table to paste into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def build(n: int, size: int, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``vlatent build-data maze`` for ``n`` examples of ``size`` x ``size``."""
    cmd = [sys.executable, "-m", "data_builders.maze", "--out", str(out), "--n", str(n), "--size", str(size)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=one_core)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=8)
    args = ap.parse_args()

    print("| examples | maze | wall s | examples/s | images | disk MiB | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.n // 10, args.n):
            out = Path(tmp) / f"maze-{n}"
            seconds, rss = build(n, args.size, out)
            files = list((out / "images").iterdir())
            disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
            print(f"| {n:,} | {args.size}x{args.size} | {seconds:.1f} | {n / seconds:,.0f} | {len(files):,} | "
                  f"{disk:.0f} | {rss:.0f} |")
    verdict = "meets" if seconds < 60 else "misses"
    print(f"\n{args.n:,} maze examples at {args.size}x{args.size} on one core: {seconds:.1f} s ({verdict} the "
          f"under-a-minute target)")


if __name__ == "__main__":
    main()
