"""The ``vlatent`` command: ``vlatent info``, ``quickstart``, ``build-data``, ``train``, ``eval``, ``demo``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from importlib import metadata
from pathlib import Path


def cmd_info(args) -> int:
    """Versions, visible devices, registered methods and backbones."""
    import torch

    from .backbones import list_backbones
    from .methods import list_methods

    print(f"vlatent {metadata.version('vlatent')}  python {platform.python_version()}  ({sys.platform})")
    for pkg in ("torch", "transformers", "deepspeed", "diffusers", "gradio", "accelerate", "datasets", "timm",
                "open_clip_torch", "peft"):
        try:
            print(f"  {pkg:16s} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            print(f"  {pkg:16s} (not installed)")
    print("devices:")
    print("  cpu")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB)")
    print(f"methods:   {', '.join(list_methods())}")
    print(f"backbones: {', '.join(list_backbones())}")
    return 0


QUICKSTART_ARMS = [  # (name, recipe, model it starts from); mirage stage 2 continues stage 1
    ("mirage_stage1", "mirage_stage1.yaml", "tiny-base"),
    ("mirage_stage2", "mirage_stage2.yaml", "mirage_stage1"),
    ("text_sft", "text_sft.yaml", "tiny-base"),
]


def cmd_quickstart(args) -> int:
    """The main job on the built-in tiny default: maze data -> DeepSpeed SFT (mirage 1+2, text) -> eval -> report."""
    import subprocess
    import time

    import torch

    from .model import LatentVLM
    from .testing import build_tiny_base

    root = Path(__file__).resolve().parents[1]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = build_tiny_base(out / "tiny-base")
    print(f"[1/4] tiny Qwen2.5-VL (random weights): {base}")
    data = out / "data"
    if not (data / "dataset_info.json").is_file():
        code = _app("data_builders.__main__").main(["maze", "--out", str(data), "--n", str(args.n), "--size", "4",
                                                     "--questions", "first_move", "--seed", "0"])
        if code:
            return code
    print(f"[2/4] maze dataset: {data}")
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    minutes = {}
    for name, recipe, start in QUICKSTART_ARMS:
        t0 = time.time()
        cmd = [sys.executable, str(root / "train" / "sft.py"), "--config", str(root / "train/recipes/tiny" / recipe),
               "--set", f"model={out / start}", "--set", f"data.train={data / 'train.jsonl'}",
               "--set", f"training.output_dir={out / name}", "--overwrite"]
        if args.max_steps:
            cmd += ["--set", f"training.max_steps={args.max_steps}"]
        print(f"[3/4] training {name}: {' '.join(cmd[1:])}")
        if subprocess.run(cmd, env=env).returncode:
            print(f"error: training {name} failed", file=sys.stderr)
            return 1
        minutes[name] = (time.time() - t0) / 60

    evaluate = _app("eval.run").evaluate
    results = {}
    for name in ("mirage_stage2", "text_sft"):
        print(f"[4/4] evaluating {name} on the held-out maze split")
        model = LatentVLM.from_pretrained(out / name).eval()
        results[name] = evaluate(model, "maze", data, out / "eval" / name, split="test", batch_size=8,
                                 max_new_tokens=args.max_new_tokens)
    report = _quickstart_report(out, results, minutes)
    print(f"\nreport: {report}")
    return 0


def _quickstart_report(out: Path, results: dict, minutes: dict) -> Path:
    """report.md: accuracy table, loss curves, a few example traces."""
    import json

    lines = ["# vlatent quick start", "",
             "A tiny Qwen2.5-VL (random init) trained on a small 4x4 maze set (first-move questions) with DeepSpeed "
             "on this machine, then evaluated on the held-out test split. The scale is a smoke test of the whole "
             "loop, not a replication: see bench/ for the learning benchmarks.", "",
             "| model | accuracy | examples | train minutes |", "|---|---|---|---|"]
    for name, scores in results.items():
        lines.append(f"| {name} | {scores.get('overall', 0):.3f} | {scores.get('num', 0)} | "
                     f"{minutes.get(name, 0) + (minutes.get('mirage_stage1', 0) if name == 'mirage_stage2' else 0):.1f} |")
    lines += ["", "## Loss curves", ""]
    for name in minutes:
        lines.append(f"![{name}]({name}/loss_curve.png)")
    lines += ["", "## Example traces", ""]
    for name in results:
        rows = [json.loads(l) for l in (out / "eval" / name / "predictions.jsonl").read_text().splitlines() if l][:3]
        lines.append(f"### {name}")
        for r in rows:
            lines.append(f"- `{r.get('id')}` gold {r.get('gold', r.get('answer'))!r}, parsed {r.get('parsed')!r}, "
                         f"correct {r.get('correct')}: {str(r.get('output', ''))[:300]!r}")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _app(module: str):
    """Import an app module (``data_builders``, ``train``, ``eval``, ``demo``) from the source checkout.

    The CLI is the one place in the package that reaches the apps, lazily; the library proper never does.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / module.split(".")[0]).is_dir():
        raise SystemExit(f"this command needs the source checkout: {root / module.split('.')[0]} is missing "
                         "(install vlatent with `pip install -e .` from a clone)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module)


# subcommand -> the app module whose main(argv) runs it
APPS = {"build-data": "data_builders.__main__", "train": "train.__main__", "eval": "eval.run", "demo": "demo.app"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlatent", description="Latent visual reasoning for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, registered methods and backbones").set_defaults(fn=cmd_info)
    sub.add_parser("build-data", help="build a dataset: vlatent build-data NAME --out DIR ... (or validate / preview)")
    sub.add_parser("train", help="train: vlatent train {sft,vlpo} --config RECIPE.yaml [--resume] [--overwrite]")
    sub.add_parser("eval", help="evaluate: vlatent eval --model PATH --bench mmmu|mmstar|maze|... --out DIR")
    sub.add_parser("demo", help="the Gradio app: vlatent demo --model PATH [--host 127.0.0.1 --port 7860]")
    q = sub.add_parser("quickstart", help="run the main job on the built-in tiny default")
    q.add_argument("--out", default="runs/quickstart", help="where the data, models, evaluations and report go")
    q.add_argument("--n", type=int, default=320, help="maze examples to build (80/10/10 split)")
    q.add_argument("--max-new-tokens", type=int, default=96)
    q.add_argument("--max-steps", type=int, default=None, help="override every arm's training steps (smoke runs)")
    q.set_defaults(fn=cmd_quickstart)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in APPS:  # the apps parse their own arguments, --help included
        return _app(APPS[argv[0]]).main(argv[1:])
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
