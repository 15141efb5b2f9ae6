"""The ``vlatent`` command: ``vlatent info``, ``quickstart``, ``build-data``, ``train``, ``eval``, ``demo``,
``pretrain-base``."""

from __future__ import annotations

import argparse
import importlib
import json
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
    ("mirage_stage1", "mirage_stage1.yaml", "base"),
    ("mirage_stage2", "mirage_stage2.yaml", "mirage_stage1"),
    ("text_sft", "text_sft.yaml", "base"),
]
# the quick start's tasks: builder arguments, what the report calls the set, answer budget (latent steps included)
QUICKSTART_TASKS = {
    # frozen-lake "is this action sequence safe?": the visual spatial planning task Mirage's release trains on
    "vsp": {"build": ["--size", "4", "--questions", "safe", "--length", "2-3"], "max_new_tokens": 192,
            "what": "4x4 frozen-lake maps (is a 2-3 move sequence safe?)",
            "words": "the same walks written out cell by cell in words"},
    "maze": {"build": ["--size", "4", "--questions", "first_move", "--wall", "6"], "max_new_tokens": 288,
             "what": "4x4 mazes (which way is the first move?)", "words": "the same routes written out in words"},
}
QUICKSTART_TASK = "vsp"  # the default: the demo's fallback examples follow it
FRESH_SEED = 20261205  # the quick start's second test set: a seed its training data never used


def cmd_quickstart(args) -> int:
    """The main job on the built-in tiny default: task data -> DeepSpeed SFT (mirage 1+2, text) -> eval -> report."""
    import subprocess
    import time

    import torch

    from .data import write_view
    from .model import LatentVLM
    from .shipped import apps_root
    from .testing import pretrained_base

    root = apps_root()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = pretrained_base()
    minutes = {"base": (time.time() - t0) / 60}
    print(f"[1/4] the tiny Qwen2.5-VL that sees (pretrained on perception captions): {base}")
    task = QUICKSTART_TASKS[args.task]
    max_new_tokens = args.max_new_tokens or task["max_new_tokens"]
    data, fresh = out / "data", out / "fresh"
    build = _app("data_builders.__main__").main
    for folder, extra in ((data, ["--n", str(args.n), "--seed", "0"]),
                          (fresh, ["--n", "100", "--seed", str(FRESH_SEED), "--split", "0,0,1"])):
        # built afresh every run (seconds): a dataset left by another --task, --n or builder version is never reused
        code = build([args.task, "--out", str(folder), *task["build"], *extra, "--overwrite"])
        if code:
            return code
    cot = write_view(data, "text_cot")  # the text baseline reasons in words: the builder's written-out trace
    print(f"[2/4] {task['what']}: {data} (and a test set built with an unseen seed: {fresh})")
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    for name, recipe, start in QUICKSTART_ARMS:
        t0 = time.time()
        cmd = [sys.executable, str(root / "train" / "sft.py"), "--config", f"tiny/{recipe}",  # a shipped recipe
               "--set", f"model={base if start == 'base' else out / start}",
               "--set", f"data.train={cot if name == 'text_sft' else data / 'train.jsonl'}",
               "--set", f"training.output_dir={out / name}", "--overwrite"]
        if args.max_steps:
            cmd += ["--set", f"training.max_steps={args.max_steps}"]
        print(f"[3/4] training {name}: {' '.join(cmd[1:])}")
        if subprocess.run(cmd, env=env).returncode:
            print(f"error: training {name} failed", file=sys.stderr)
            return 1
        minutes[name] = (time.time() - t0) / 60

    evaluate, EvalError = _app("eval.run").evaluate, _app("eval.benchmarks").EvalError
    results = {}
    for name in ("mirage_stage2", "text_sft"):
        print(f"[4/4] evaluating {name} on the held-out {args.task} split and the unseen-seed set")
        model = LatentVLM.from_pretrained(out / name).eval()
        try:
            results[name] = {which: evaluate(model, args.task, folder, out / "eval" / (name if which == "test" else
                                                                                        f"{name}_fresh"),
                                             split="test", batch_size=8, max_new_tokens=max_new_tokens)
                             for which, folder in (("test", data), ("fresh", fresh))}
        except EvalError as e:  # e.g. every example failed: one line naming the first failure; the models stay in OUT
            print(f"error: evaluating {name}: {e}", file=sys.stderr)
            return 1
    report = _quickstart_report(out, base, task, results, minutes)
    print(f"\nreport: {report}")
    return 0


def _quickstart_n(text: str) -> int:
    """``quickstart --n``: enough examples that the builders' split leaves no split (the test split above all) empty."""
    common = _app("data_builders.common")
    fewest = common.fewest_examples(common.SYNTHETIC_SPLIT)
    if not text.isdigit() or int(text) < fewest:
        raise argparse.ArgumentTypeError(f"expected at least {fewest} examples, got {text!r}: the builders' "
                                         f"{'/'.join(f'{f:.0%}' for f in common.SYNTHETIC_SPLIT)} split of fewer "
                                         "leaves the test split empty")
    return int(text)


def _majority(path: Path) -> float:
    """Accuracy of always giving the most frequent answer of a split file."""
    from collections import Counter

    answers = [json.loads(line)["answer"] for line in path.read_text().splitlines() if line.strip()]
    return Counter(answers).most_common(1)[0][1] / len(answers)


def _quickstart_report(out: Path, base: Path, task: dict, results: dict, minutes: dict) -> Path:
    """report.md: accuracy against the majority answer on both test sets, loss curves, a few example traces."""
    predictions = {name: [json.loads(line) for line in (out / "eval" / name / "predictions.jsonl").read_text()
                          .splitlines() if line] for name in results}
    majority = {which: _majority(out / folder / "test.jsonl") for which, folder in (("test", "data"),
                                                                                    ("fresh", "fresh"))}
    lines = ["# vlatent quick start", "",
             f"The tiny Qwen2.5-VL that sees (`{base}`: pretrained on perception captions of the builders' pictures, "
             f"never on their questions) fine-tuned with DeepSpeed on this machine on a small set of {task['what']}: "
             f"Mirage stage 1 then 2, and the text baseline ({task['words']}: text chain of thought). "
             "Evaluated on the held-out "
             "test split and on a test set built with a seed the training data never used. The scale is a demo of "
             "the whole loop, not a replication: see bench/LEARNING.md for the learning benchmark.", "",
             "| model | test accuracy | unseen-seed accuracy | distinct answers (test) | latent mode "
             "| train minutes |", "|---|---|---|---|---|---|",
             f"| always the most frequent answer | {majority['test']:.3f} | {majority['fresh']:.3f} | 1 | — | — |"]
    for name, scores in results.items():
        rows = predictions[name]
        train = minutes.get(name, 0) + (minutes.get("mirage_stage1", 0) if name == "mirage_stage2" else 0)
        mode = json.loads((out / "eval" / name / "run.json").read_text()).get("latent", "—")
        lines.append(f"| {name} | {scores['test'].get('overall', 0):.3f} | {scores['fresh'].get('overall', 0):.3f} "
                     f"| {len({r.get('parsed') for r in rows})} | {mode} "
                     f"| {train:.1f} |")
    lines += ["", f"Base: {minutes['base']:.1f} min in this run (0 when the shipped or cached base is reused).",
              "", "## Loss curves", ""]
    for name in minutes:
        if name != "base":
            lines.append(f"![{name}]({name}/loss_curve.png)")
    lines += ["", "## Example traces", ""]
    for name in results:
        rows = predictions[name][:4]
        lines.append(f"### {name}")
        for r in rows:
            lines.append(f"- `{r.get('id')}` gold {r.get('gold', r.get('answer'))!r}, parsed {r.get('parsed')!r}, "
                         f"correct {r.get('correct')}: {str(r.get('output', ''))[:300]!r}")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _app(module: str):
    """Import an app module (``data_builders``, ``train``, ``eval``, ``demo``) from the checkout or the install
    (``vlatent/_apps``, see ``vlatent.shipped``).

    The CLI is the one place in the package that reaches the apps, lazily; the library proper never does.
    """
    from .shipped import apps_root

    root = apps_root()
    if not (root / module.split(".")[0]).is_dir():
        raise SystemExit(f"{root / module.split('.')[0]} is missing: reinstall vlatent (`pip install .`)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module)


# subcommand -> the app module whose main(argv) runs it
APPS = {"build-data": "data_builders.__main__", "train": "train.__main__", "eval": "eval.run", "demo": "demo.app",
        "pretrain-base": "train.pretrain_base"}
EXTRAS = {"gradio": "demo", "deepspeed": "train"}  # optional packages (setup.py extras) an app may import


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlatent", description="Latent visual reasoning for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, registered methods and backbones").set_defaults(fn=cmd_info)
    sub.add_parser("build-data", help="build a dataset: vlatent build-data NAME --out DIR ... (or validate / preview)")
    sub.add_parser("train", help="train: vlatent train {sft,vlpo} --config RECIPE.yaml [--resume] [--overwrite]")
    sub.add_parser("eval", help="evaluate: vlatent eval --model PATH --bench mmmu|mmstar|maze|... --out DIR")
    sub.add_parser("pretrain-base", help="pretrain the tiny base that sees: vlatent pretrain-base --out DIR")
    sub.add_parser("demo", help="the Gradio app: vlatent demo --model PATH [--host 127.0.0.1 --port 7860]")
    q = sub.add_parser("quickstart", help="run the main job on the built-in tiny default")
    q.add_argument("--out", default="runs/quickstart", help="where the data, models, evaluations and report go")
    q.add_argument("--task", choices=sorted(QUICKSTART_TASKS), default=QUICKSTART_TASK,
                   help="vsp: frozen-lake safety (Mirage's own task; default), maze: first move in a 4x4 maze")
    q.add_argument("--n", type=_quickstart_n, default=2000, help="examples to build (80/10/10 split; at least 6)")
    q.add_argument("--max-new-tokens", type=int, default=None,
                   help="per answer, latent steps included (default: vsp 192, maze 288; the longest traces with K=4 "
                        "take ~170 and ~285)")
    q.add_argument("--max-steps", type=int, default=None, help="override every arm's training steps (smoke runs)")
    q.set_defaults(fn=cmd_quickstart)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in APPS:  # the apps parse their own arguments, --help included
        try:
            app = _app(APPS[argv[0]])
        except ModuleNotFoundError as e:  # an optional part not installed: say which extra brings it
            if e.name not in EXTRAS:
                raise
            raise SystemExit(f"error: vlatent {argv[0]} needs {e.name}: pip install 'vlatent[{EXTRAS[e.name]}]'")
        return app.main(argv[1:])
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
