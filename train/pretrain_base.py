"""Pretrain the tiny base that sees: a real Qwen2.5-VL sized for 2 CPU cores, taught to read the synthetic tasks'
pictures back as text (perception only: `vlatent build-data captions`), then saved as a plain HF checkpoint that
every method loads like `Qwen/Qwen2.5-VL-7B-Instruct`.

    vlatent pretrain-base --out runs/base                  # ~20 min on 2 cores
    python train/pretrain_base.py --out runs/base --steps 400 --n 4000    # a quick, weaker one

Writes DIR/ (model.safetensors, processor, `vlatent_base.json`: the command, seed, commit, wall time and held-out
perception accuracy per picture kind) and DIR/loss_curve.png. Same seed, same weights. The training run (captions,
recipe, log history) stays in DIR/run/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_builders import captions  # noqa: E402
from vlatent.testing import SEEING_BASE, build_tiny_base  # noqa: E402


def commit() -> str:
    """The checkout's commit, with "+dirty" when its tracked files have changes (the code is then not that commit's)."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return git("rev-parse", "HEAD").strip() + ("+dirty" if git("status", "--porcelain", "-uno").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def perception_accuracy(model, records: list[dict], batch_size: int = 32) -> dict:
    """Held-out reading accuracy per picture kind: the share of cells (points, gaps) the greedy caption gets right."""
    from PIL import Image
    from tqdm.auto import tqdm

    right, total = {}, {}
    for a in tqdm(range(0, len(records), batch_size), desc="perception check", unit="batch"):
        chunk = records[a:a + batch_size]
        gens = model.generate([[Image.open(r["images"][0])] for r in chunk],
                              [r["messages"][0]["content"][-1]["text"] for r in chunk],
                              max_new_tokens=max(len(model.processor.tokenizer(r["answer"]).input_ids) for r in chunk)
                              + 16)
        for r, g in zip(chunk, gens):
            k = r["meta"]["kind"]
            ok, n = captions.score(r, g.text)
            right[k], total[k] = right.get(k, 0) + ok, total.get(k, 0) + n
    return {k: round(right[k] / total[k], 4) for k in sorted(total)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vlatent pretrain-base", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the pretrained base")
    ap.add_argument("--seed", type=int, default=0, help="seeds the initial weights, the captions and the run")
    ap.add_argument("--n", type=int, default=40000, help="captioned pictures to build (95%% train, 5%% held out)")
    ap.add_argument("--steps", type=int, default=5000, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kinds", default=",".join(captions.DEFAULT_KINDS),
                    help=f"caption kinds, comma-separated (default: %(default)s; also {', '.join(captions.KINDS[4:])}:"
                         " lines drawn on mazes and lakes, so the vision tower tells the tasks' helper images from "
                         "their question pictures)")
    ap.add_argument("--init", help="continue from this base folder (e.g. vlatent/assets/tiny_base) instead of random "
                                   "weights of the seeing base's size")
    ap.add_argument("--held-out", type=int, default=400, help="held-out pictures scored after training")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)

    from vlatent.data import load_records
    from vlatent.model import LatentVLM

    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} is not empty: pass --overwrite to replace it", file=sys.stderr)
        return 2
    t0 = time.time()
    work = out / "run"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "captions"
    if not (data / "dataset_info.json").is_file():
        if captions.main(["--out", str(data), "--n", str(args.n), "--seed", str(1000 + args.seed),
                          "--split", "0.95,0.05,0", "--kinds", args.kinds]):
            return 1
    init = Path(args.init).resolve() if args.init else build_tiny_base(work / "init", seed=args.seed, **SEEING_BASE)
    recipe = {"model": str(init), "method": "text",
              "data": {"train": str(data / "train.jsonl")},
              "training": {"output_dir": str(work / "sft"), "per_device_train_batch_size": args.batch,
                           "learning_rate": args.lr, "max_steps": args.steps, "warmup_steps": args.steps // 30,
                           "lr_scheduler_type": "cosine", "weight_decay": 0.01,
                           "logging_steps": max(1, args.steps // 100),
                           "seed": args.seed, "data_seed": args.seed, "dataloader_num_workers": 1}}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    from train.sft import main as sft

    if sft(["--config", str(work / "recipe.yaml"), "--overwrite"]):
        return 1
    train_s = time.time() - t0

    model = LatentVLM.from_pretrained(work / "sft").eval()
    held_out = load_records(data / "val.jsonl")[: args.held_out]
    accuracy = perception_accuracy(model, held_out)
    model.backbone.model.save_pretrained(out)
    model.processor.save_pretrained(out)
    shutil.copy(work / "sft" / "loss_curve.png", out / "loss_curve.png")
    info = {"command": "vlatent pretrain-base " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": args.seed, "init": args.init, "commit": commit(), "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "captions": args.n, "config": SEEING_BASE, "train_minutes": round(train_s / 60, 1),
            "total_minutes": round((time.time() - t0) / 60, 1), "threads": os.environ.get("OMP_NUM_THREADS"),
            "held_out_pictures": len(held_out), "perception_accuracy": accuracy}
    (out / "vlatent_base.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
