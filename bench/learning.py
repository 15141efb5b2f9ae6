"""Does latent visual reasoning learn? Every arm of `train/recipes/learning/` fine-tuned from the same tiny base that
sees (`vlatent pretrain-base`) with the same number of examples seen, on four synthetic tasks, over several seeds;
test accuracy, accuracy on a test set built with a seed the bench never uses otherwise, chance, and the intervention
check (accuracy with the latents zeroed, swapped between examples, or replaced by noise).

    python bench/learning.py --budget small                     # CPU, 70-105 min on 2 cores -> bench/LEARNING.md
    python bench/learning.py --budget medium --arms text_direct,text_cot,mirage --tasks maze,vsp --no-tune \
        --out runs/learning_medium --report bench/LEARNING_medium.md   # 4x the training: 117 job-minutes
    python bench/learning.py --budget full --jobs 8             # the same recipes scaled for a GPU
    python bench/learning.py --budget small --arms text_direct,mirage --tasks maze --seeds 0 --out runs/l
    python bench/learning.py --budget medium --arms mirage,cocova --tasks vsp,jigsaw --no-tune \
        --method-config latent_bottleneck=true --report runs/bottleneck.md   # the latents as the only way to the answer

Each (arm, task, seed, learning rate) is one job in its own process (`--jobs` at a time); a finished job leaves
`result.json` in its folder and is not rerun while its settings, budget and the arm's settings for its task stay the
same, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from vlatent.data import write_view

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train/ and eval/ are folders of the repository, not installed packages
ARMS_DIR = ROOT / "train" / "recipes" / "learning"
TASKS = {  # builder arguments: fixed question type and size per task (4x4: one image token per cell)
    "maze": ["--size", "4", "--questions", "first_move", "--wall", "6"],
    "vsp": ["--size", "4", "--questions", "safe", "--length", "2-3"],
    # one candidate pasted into the gap, yes / no: the tiny base does not learn to compare four candidate images
    # (0.21-0.30 in every layout tried, exact copies included); plain pictures and foreign tiles: seams it can see
    "jigsaw": ["--grid", "2", "--question", "fits", "--distractors", "foreign", "--shapes", "0-2"],
    "depth": ["--marker", "24"],  # A and B as discs: the default 6 px dots and labels vanish into one 28 px token
}
BUDGETS = {
    # examples: seen per arm (over all its stages); n: built per task (train/val/test split 80/10/10);
    # val_examples: the first N of the val split score a tuning trial (None: all)
    "small": {"n": 2000, "examples": 1600, "batch": 8, "val_examples": 100, "device_note": "2 CPU cores"},
    # small's data with 4x the training: what text chain of thought needs to learn maze and vsp (text_direct, text_cot
    # and mirage on those two tasks, 3 seeds, --no-tune: 116.6 job-minutes on 2 CPU cores)
    "medium": {"n": 2000, "examples": 6400, "batch": 8, "val_examples": 100, "device_note": "2 CPU cores"},
    "full": {"n": 8000, "examples": 12800, "batch": 16, "val_examples": None, "device_note": "2 CPU cores"},
}
FRESH_SEED = 20261205  # the unseen-seed test set per task (a tenth of the budget's n): a seed nothing else uses
INTERVENTIONS = ("zero", "swap", "noise")
EVAL_BATCH = 50  # generation rows at once: 1.5x faster than 16 on one CPU thread, the same greedy outputs (maze, 200)
STAGE_KEYS = ("method", "method_config", "share", "from", "teacher")  # the rest of a stage goes to its SFT recipe
NOTES_MARK = "<!-- notes: written by hand below this line, kept when the report is rewritten -->"
TASK_COST = {"maze": 2}  # relative job time (a 4x4 maze record traces ~4 latent steps), for scheduling
# imported once by the server every job's process is forked from (~7 s a job otherwise)
PRELOAD = ["__main__", "torch", "transformers", "train.sft", "eval.run", "vlatent.analysis", "vlatent.model"]


def load_arm(name: str, arms_dir: Path = ARMS_DIR) -> dict:
    path = Path(arms_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(arms_dir).glob("*.yaml"))
        raise SystemExit(f"error: no arm {name!r} in {arms_dir} (known: {', '.join(known)})")
    arm = yaml.safe_load(path.read_text())
    for key in ("tasks", "records", "stages", "learning_rates", "eval"):
        if key not in arm:
            raise SystemExit(f"error: arm {str(path)!r} has no {key!r}")
    return arm


def override_method_config(arms: dict[str, dict], pairs: list[str]) -> None:
    """``KEY=VALUE`` strings (values read as YAML) set in every stage's ``method_config`` of every arm, in place (the
    jobs' fingerprints follow, so results trained without them are not reused)."""
    for kv in pairs:
        if "=" not in kv:
            raise SystemExit(f"error: --method-config takes KEY=VALUE, got {kv!r}")
        key, value = kv.split("=", 1)
        for arm in arms.values():
            for stage in arm["stages"]:
                stage.setdefault("method_config", {})[key] = yaml.safe_load(value)


# -- data ----------------------------------------------------------------------------------------------------------
def build_task(task: str, root: Path, n: int, seed: int = 0, split: str = "0.8,0.1,0.1", name: str = "data") -> Path:
    """The task's data under ``root/name``, built once; rebuilt, and the task's finished jobs dropped, when the
    folder was built with other builder arguments (an edited ``TASKS`` entry) or by another version of its builder."""
    out = root / name / task
    argv = ["--out", str(out), "--n", str(n), "--seed", str(seed), "--split", split, *TASKS[task]]
    if (out / "dataset_info.json").is_file():
        if built_with(task, out, argv):
            return out
        print(f"{out}: built with other arguments than {' '.join(TASKS[task])!r} or by another builder version: "
              "rebuilding it and rerunning its jobs", flush=True)
        shutil.rmtree(out)
        for stale in (root / "runs").glob(f"*/{task}"):
            shutil.rmtree(stale)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "data_builders", task, *argv], check=True, cwd=ROOT, capture_output=True)
    return out


def built_with(task: str, out: Path, argv: list[str]) -> bool:
    """Whether ``out``'s dataset_info.json records the builder's current version and the arguments ``argv`` parse to
    (an option newer than the folder counts as its default)."""
    builder = importlib.import_module(f"data_builders.{task}")
    parser = builder.parser()
    plain = lambda ns: {k: v for k, v in json.loads(json.dumps(vars(ns), default=str)).items()  # noqa: E731
                        if k not in ("out", "overwrite")}
    defaults = plain(parser.parse_args(argv[:8]))  # --out, --n, --seed, --split
    info = json.loads((out / "dataset_info.json").read_text())
    if info.get("version") != builder.VERSION:
        return False
    recorded = info["arguments"]
    return {**defaults, **{k: v for k, v in recorded.items() if k in defaults}} == plain(parser.parse_args(argv))


def prepare(arm: dict, data: Path) -> None:
    """The arm's one-off step per task folder (e.g. training perception's depth tokenizer), cached by its --out."""
    if "prepare" not in arm:
        return
    cmd = [str(x).format(data=data) for x in arm["prepare"]]
    out = Path(cmd[cmd.index("--out") + 1])
    if not out.is_dir():
        subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT, capture_output=True)


def eval_settings(arm: dict, task: str) -> dict:
    """The arm's ``latent`` mode and ``max_new_tokens`` on ``task`` (a number, or per task with a ``default``)."""
    max_new_tokens = arm["eval"]["max_new_tokens"]
    if isinstance(max_new_tokens, dict):
        max_new_tokens = max_new_tokens.get(task, max_new_tokens["default"])
    return {"latent": arm["eval"]["latent"], "max_new_tokens": max_new_tokens}


# -- one job: train the arm's stages, evaluate, intervene -----------------------------------------------------------
def run_job(job: dict) -> dict:
    from eval.run import evaluate
    from train.sft import main as sft
    from vlatent.model import LatentVLM

    arm, budget, out = job["arm"], job["budget"], Path(job["out"])
    train = write_view(job["data"], arm["records"])
    t0 = time.time()
    outputs, history, seen = [], [], 0
    for i, stage in enumerate(arm["stages"]):
        start = outputs[stage.get("from", i - 1)] if i else job["base"]
        method_config = {k: v.format(data=job["data"]) if isinstance(v, str) else v
                         for k, v in stage.get("method_config", {}).items()}
        if "teacher" in stage:
            method_config["teacher"] = outputs[stage["teacher"]]
        steps = max(1, round(stage["share"] * budget["examples"] / budget["batch"]))
        recipe = {"model": str(start), "method": stage["method"], "method_config": method_config,
                  # no max_length: the records are built here, a few hundred tokens long, and the up-front length
                  # pass would encode every record once more per stage (~15% of a job)
                  "data": {"train": str(train)},
                  "training": {"output_dir": str(out / f"stage{i}"), "per_device_train_batch_size": budget["batch"],
                               "learning_rate": job["lr"], "max_steps": steps, "warmup_steps": max(1, steps // 20),
                               "lr_scheduler_type": "cosine", "logging_steps": max(1, steps // 20),
                               "seed": job["seed"], "data_seed": job["seed"], "disable_tqdm": True}}
        recipe.update({k: v for k, v in stage.items() if k not in STAGE_KEYS})  # freezing switches, lora
        if i:  # later stages continue a vlatent checkpoint, which knows its method
            recipe.pop("method")
        path = out / f"stage{i}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        if sft(["--config", str(path), "--overwrite"]) != 0:
            raise RuntimeError(f"training stage {i} of {job['name']} failed")
        outputs.append(str(out / f"stage{i}"))
        logs = json.loads((out / f"stage{i}" / "log_history.json").read_text())
        history += [[seen + e["step"] * budget["batch"], e["loss"]] for e in logs if "loss" in e and "step" in e]
        seen += steps * budget["batch"]
    train_s = time.time() - t0

    model = LatentVLM.from_pretrained(outputs[-1]).eval()
    result = {"name": job["name"], "task": job["task"], "seed": job["seed"], "lr": job["lr"], "examples_seen": seen,
              "train_s": train_s, "history": history, "interventions": {}, "stages": outputs}
    if job["split"] == "val":  # a tuning trial: only the rate val picks is scored on test (run_test)
        scores = evaluate(model, job["task"], job["data"], out / "eval_val", split="val", batch_size=EVAL_BATCH,
                          limit=budget.get("val_examples"), progress=False, **eval_settings(arm, job["task"]))
        result["val_accuracy"] = scores["overall"]
    else:
        result.update(test_scores(model, job, out))
    result["total_s"] = time.time() - t0
    return result


def test_scores(model, job: dict, out: Path) -> dict:
    """Test accuracy, then the intervention columns (for an arm with latents)."""
    from eval.run import evaluate

    settings = eval_settings(job["arm"], job["task"])
    scores = evaluate(model, job["task"], job["data"], out / "eval_test", split="test", batch_size=EVAL_BATCH,
                      progress=False, **settings)
    fresh = evaluate(model, job["task"], job["fresh"], out / "eval_fresh", split="test", batch_size=EVAL_BATCH,
                     progress=False, **settings)
    return {"accuracy": scores["overall"], "fresh_accuracy": fresh["overall"], "latent": settings["latent"],
            **intervention_scores(model, job["task"], job["data"], settings, job["seed"])}


def intervention_scores(model, task: str, data: str, settings: dict, seed: int) -> dict:
    """Test accuracy with every latent zeroed, swapped with another example's, or replaced by same-norm noise, and
    the share of answers whose text changed, against the unmodified run ({} for an arm without latents)."""
    from eval.benchmarks import get_benchmark, judge, load_examples
    from eval.run import latent_kwargs
    from vlatent.analysis import generated_specificity, intervene
    from vlatent.analysis.intervene import next_with_latents

    if not model.method.uses_latents:
        return {}
    bench = get_benchmark(task)
    examples = [ex for ex in load_examples(bench, data, "test") if ex.error is None]
    images, prompts = [ex.open_images() for ex in examples], [ex.prompt for ex in examples]
    kwargs = dict(max_new_tokens=settings["max_new_tokens"], **latent_kwargs(model, settings["latent"]))
    chunks = [(a, min(a + EVAL_BATCH, len(examples))) for a in range(0, len(examples), EVAL_BATCH)]
    baseline = [g for a, b in chunks for g in model.generate(images[a:b], prompts[a:b], **kwargs)]
    scores = {"latent_rate": sum(bool(g.latent_segments) for g in baseline) / len(baseline), "interventions": {}}
    alike = generated_specificity(baseline)  # swapping latents that every example shares changes nothing
    if alike is not None:
        scores["latent_across"] = alike.across
    # "swap": intervene's own donor rule (the next example with latents), over the whole split rather than per batch;
    # the one example of a split where no other has latents keeps its own
    donor = [d if d is not None else i for i, d in enumerate(next_with_latents(baseline, i)
                                                             for i in range(len(baseline)))]
    for mode in INTERVENTIONS:
        correct = changed = donors_correct = 0
        for a, b in chunks:
            swap = {"donor_runs": [baseline[d] for d in donor[a:b]]} if mode == "swap" else {}
            runs = intervene(model, images[a:b], prompts[a:b], mode, baseline=baseline[a:b], seed=seed, **swap,
                             **kwargs)
            correct += sum(judge(bench, ex, r.generation.text)["correct"] for ex, r in zip(examples[a:b], runs))
            changed += sum(r.changed for r in runs)
            if mode == "swap":  # judged against the donor's answer: latents that carry their example answer for it
                donors_correct += sum(judge(bench, examples[d], r.generation.text)["correct"]
                                      for d, r in zip(donor[a:b], runs))
        scores["interventions"][mode] = {"accuracy": correct / len(examples), "changed": changed / len(examples)}
        if mode == "swap":
            scores["interventions"][mode]["donor_accuracy"] = donors_correct / len(examples)
    return scores


def run_test(job: dict) -> dict:
    """The test split and the interventions for the tuning trial val picked (the other rates never see test)."""
    from vlatent.model import LatentVLM

    t0 = time.time()
    model = LatentVLM.from_pretrained(job["model"]).eval()
    scores = test_scores(model, job, Path(job["out"]))
    return {"kind": "test", **{k: job[k] for k in ("name", "task", "seed", "lr")}, **scores,
            "total_s": time.time() - t0}


def run_sketches(job: dict) -> dict:
    """Sketchpad's pictures: train the arm's sketch decoder for its final model's ViT (the arm's ``figure.decoder``
    command), then draw the first test examples' generated sketches beside their true helper images, and score the
    first ``figure.scored`` examples' sketches against them (``score_drawn``)."""
    from PIL import Image, ImageDraw

    from eval.benchmarks import get_benchmark, load_examples
    from eval.run import latent_kwargs
    from vlatent.data import load_records
    from vlatent.decoders import load_decoder
    from vlatent.model import LatentVLM

    out, data, spec = Path(job["out"]), Path(job["data"]), job["figure"]
    decoder_dir = out / "decoder"
    cmd = [str(x).format(data=data, model=job["model"], out=decoder_dir) for x in spec["decoder"]]
    subprocess.run([sys.executable, *cmd, "--overwrite"], check=True, cwd=ROOT)
    decoder, model = load_decoder(decoder_dir), LatentVLM.from_pretrained(job["model"]).eval()
    decoder_metrics = json.loads((decoder_dir / "metrics.json").read_text())
    n, steps, size = spec.get("examples", 8), spec.get("steps", 3), decoder.config.image_size
    examples = [ex for ex in load_examples(get_benchmark(job["task"]), data, "test") if ex.error is None]
    examples = examples[: max(n, spec.get("scored", n))]
    records = {r["id"]: r for r in load_records(data / "test.jsonl")}
    gens = model.generate([ex.open_images() for ex in examples], [ex.prompt for ex in examples],
                          max_new_tokens=job["max_new_tokens"], **latent_kwargs(model, job["latent"]))
    drawn, truth = [], [helper_images(records[ex.id]) for ex in examples]
    for gen in gens:  # a segment cut short by max_new_tokens (the last one) is skipped
        whole = [seg for seg in gen.latent_segments if len(seg.features) == decoder.config.num_features]
        drawn.append(decoder.render(whole) if whole else [])
    colour = decoder_metrics["args"].get("path_color")
    colour = tuple(map(int, colour.split(","))) if colour else None
    scores = score_drawn(drawn, truth, colour, size)
    forced = teacher_forced_scores(model, decoder, [records[ex.id] for ex in examples], colour)
    label_h = 14
    sheet = Image.new("RGB", ((1 + 2 * steps) * (size + 4), label_h + len(examples[:n]) * (size + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(["input"] + [f"{w} {i + 1}" for i in range(steps) for w in ("true", "drawn")]):
        draw.text((c * (size + 4) + 2, 1), name, fill="black")
    for row, (ex, true, mine) in enumerate(zip(examples[:n], truth, drawn)):
        cells = [Image.open(records[ex.id]["images"][0])] + [
            im for i in range(steps) for im in (Image.open(true[i]) if i < len(true) else None,
                                                 mine[i] if i < len(mine) else None)]
        for c, im in enumerate(cells):
            if im is not None:
                sheet.paste(im.convert("RGB").resize((size, size)), (c * (size + 4), label_h + row * (size + 4)))
    sheet.save(job["figure_out"])
    recon = Path(job["figure_out"]).with_name(Path(job["figure_out"]).stem + "_reconstructions.png")
    recon.write_bytes((decoder_dir / "reconstructions.png").read_bytes())
    return {"kind": "sketches", "name": job["name"], "task": job["task"], "seed": job["seed"], "lr": job["lr"],
            "metrics": decoder_metrics, "drawn": scores, "teacher_forced": forced, "sketches": job["figure_out"],
            "reconstructions": str(recon), "segments": [len(g.latent_segments) for g in gens[:n]]}


def teacher_forced_scores(model, decoder, records: list[dict], colour: tuple[int, int, int] | None) -> dict:
    """``score_drawn`` on what the head draws given the true earlier steps (``teacher_forced_pictures``): all its
    sketches, and its first ones alone (a first sketch has no true earlier one in the head's context to copy the
    route so far from)."""
    drawn, truth = teacher_forced_pictures(model, decoder, records), [helper_images(r) for r in records]
    size = decoder.config.image_size
    return {"all": score_drawn(drawn, truth, colour, size),
            "first": score_drawn([d[:1] for d in drawn], [t[:1] for t in truth], colour, size)}


def teacher_forced_pictures(model, decoder, records: list[dict]) -> list[list]:
    """Per record, the pictures of what a Sketchpad head draws at each latent step given the true earlier steps
    (``Sketchpad.teacher_forced_sketches``), decoded."""
    k, pictures = model.method.config.num_latent_tokens, [[] for _ in records]
    for first in range(0, len(records), 16):
        batch = model.collator()(records[first:first + 16])
        drawn, _ = model.method.teacher_forced_sketches(model, batch)
        rows = model.latent_slots(batch)[0].view(-1, k)[:, 0].tolist()  # each segment's row, in order
        for row, picture in zip(rows, decoder.decode(drawn)):
            pictures[first + row].append(picture)
    return pictures


def helper_images(record: dict) -> list[str]:
    """The record's helper images (what its latent steps stand for), in order."""
    return [record["images"][item["image"]] for item in record["messages"][-1]["content"] if item["type"] == "latent"]


def score_drawn(drawn: list[list], truth: list[list[str]], colour: tuple[int, int, int] | None, size: int) -> dict:
    """The model's decoded sketches (per example, per step) against the true helper image of the same step
    (``own``), and against the next example's at that step (``other``): a drawing specific to its example scores
    higher on ``own``; one average picture for every input scores the same on both."""
    import torch
    from PIL import Image

    from train.sketch_decoder import metrics
    from vlatent.decoders.sketch import to_tensor

    def versus(shift: int) -> dict | None:
        pairs = [(im, truth[(i + shift) % len(truth)][step]) for i, mine in enumerate(drawn)
                 for step, im in enumerate(mine) if step < len(truth[(i + shift) % len(truth)])]
        if not pairs:
            return None
        pred = torch.stack([to_tensor(im, size) for im, _ in pairs])
        target = torch.stack([to_tensor(Image.open(path), size) for _, path in pairs])
        return {**metrics(pred, target, colour), "sketches": len(pairs)}

    return {"examples": len(drawn), "own": versus(0), "other": versus(1) if len(drawn) > 1 else None}


def drawn_line(drawn: dict | None, what: str = "The model's own sketches") -> list[str]:
    """The report's sentence on decoded sketches (``score_drawn``): by default the model's own, generated."""
    if not drawn:
        return []
    own, other = drawn["own"], drawn["other"]
    if own is None:
        return [f"The model drew no whole sketch on the {drawn['examples']} scored test examples."]
    key = "path_iou" if "path_iou" in own else "foreground_iou"
    line = (f"{what} ({own['sketches']} from {drawn['examples']} test examples, decoded) against "
            f"the true helper image of the same step: {key} {own[key]:g}, psnr {own['psnr']:g}")
    if other:
        line += (f"; against the next test example's helper image at that step: {key} {other[key]:g}, psnr "
                 f"{other['psnr']:g} (a drawing specific to its example scores higher against its own)")
    return [line + "."]


def forced_lines(forced: dict | None) -> list[str]:
    """The report's sentences on what the head draws given the true earlier steps (``teacher_forced_pictures``): all
    its sketches, then the first ones alone."""
    if not forced:
        return []
    return [*drawn_line(forced["all"], "Given the true earlier steps (the true sketches in the latent slots and in the "
                                       "head's context), its head's sketches"),
            *drawn_line(forced["first"], "Its head's first sketches alone, with no earlier sketch in its context to "
                                         "copy the route so far from,")]


# -- the whole benchmark ---------------------------------------------------------------------------------------------
def trace_check(result: dict, data: Path) -> dict | None:
    """How right the job's written test traces are, cell sentence by cell sentence (`vlatent.analysis.trace`), read
    from its test predictions (a tuned job scored test in its ``test`` folder)."""
    from eval.run import PREDICTIONS
    from vlatent.analysis import trace_scores

    folder = Path(result["stages"][-1]).parent
    found = [p for p in (folder / "test" / "eval_test", folder / "eval_test") if (p / PREDICTIONS).is_file()]
    if not found:
        return None
    references = {r["id"]: r["meta"]["text_cot"] for r in map(json.loads, (data / "test.jsonl").open())
                  if "text_cot" in r.get("meta", {})}
    return trace_scores(references, [json.loads(line) for line in (found[0] / PREDICTIONS).open()])


def fingerprint(job: dict) -> dict:
    """What a job's result depends on (its settings, budget, and the arm as it applies to the job's task), kept in
    result.json to spot stale results: editing an arm's settings for one task leaves its other tasks' results valid."""
    settings = {k: v for k, v in job.items() if k not in ("out", "cost", "commit")}
    if "arm" in job:  # not a sketches job
        # the figure is the sketches job's own setting: a new decoder recipe redraws the figure, not the training
        settings["arm"] = {k: v for k, v in job["arm"].items() if k not in ("tasks", "cost", "eval", "figure")}
        settings["arm"]["eval"] = eval_settings(job["arm"], job["task"])
    return json.loads(json.dumps(settings))


RUNNERS = {"train": run_job, "test": run_test, "sketches": run_sketches}


def child(job: dict) -> None:
    """One job's process: its output goes to its log.txt, its result to result.json."""
    out = Path(job["out"])
    with open(out / "log.txt", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    result = RUNNERS[job.get("kind", "train")](job)
    (out / "result.json").write_text(json.dumps({**result, "commit": job["commit"], "job": fingerprint(job)}))


def launch(job: dict, mp) -> dict:
    """Run one job in its own process (isolated memory, one thread), forked from ``mp``'s server that has the heavy
    imports done, unless its result is already on disk."""
    out = Path(job["out"])
    done = out / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if fingerprint(result.get("job", job)) == fingerprint(job):
            return {**result, "reused": True}
        shutil.rmtree(out)  # the arm or budget changed since: start the job afresh (its evaluations too)
    out.mkdir(parents=True, exist_ok=True)
    proc = mp.Process(target=child, args=(job,), name=job["name"])
    proc.start()
    proc.join()
    code = proc.exitcode
    if code or not done.is_file():
        return {**{k: job.get(k) for k in ("kind", "name", "task", "seed", "lr")},
                "error": f"job failed (exit {code}): see {out / 'log.txt'}"}
    return json.loads(done.read_text())


def run_all(jobs: list[dict], workers: int, then, mp) -> list[dict]:
    """Run jobs ``workers`` at a time, the costliest waiting one first; ``then(result)`` returns the jobs a finished
    one unlocks (a tuned pair's other seeds), which join the queue."""
    pending, results, running = list(jobs), [], 0
    cond = threading.Condition()

    def worker():
        nonlocal running
        while True:
            with cond:
                while not pending and running:
                    cond.wait()
                if not pending:
                    return
                pending.sort(key=lambda j: j["cost"])
                job, running = pending.pop(), running + 1
            result, more = launch(job, mp), []
            try:
                more = then(result)
            finally:
                with cond:
                    results.append(result)
                    pending.extend(more)
                    running -= 1
                    cond.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def chance(data: Path) -> tuple[float, float]:
    """(uniform guess over the answers that occur, always-the-most-frequent-answer) on the test split."""
    answers = [json.loads(line)["answer"] for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    counts = {a: answers.count(a) for a in set(answers)}
    return 1 / len(counts), max(counts.values()) / len(answers)


def base_info(path: str, kind: str, seconds: float) -> dict:
    """What the arms start from, for the report: its kind, folder, held-out perception and the time it took here."""
    info_file = Path(path) / "vlatent_base.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return {"kind": kind, "path": path, "seconds": round(seconds, 1),
            "perception": info.get("perception_accuracy"), "pretrain_minutes": info.get("total_minutes"),
            "config": info.get("config")}


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def reused(done: list[dict], now: str) -> str:
    """How many of the invocation's jobs came from an earlier invocation's result.json, in words, with the commits that
    made those (the fingerprints hold settings, not code: a job reused across commits ran the older code)."""
    old = [r for r in done if r.get("reused")]
    if not old:
        return "every job run afresh"
    made = collections.Counter(r.get("commit", "an unrecorded commit") for r in old)
    return f"reusing {len(old)} of {len(done)} finished jobs, " + (
        f"all made at this commit, {now}" if set(made) == {now}
        else f"made at {', '.join(f'{c} ({n})' for c, n in made.items())}; this is {now}")


def command_line(ap: argparse.ArgumentParser, args) -> str:
    """The invocation with every option that can change a result and differs from its default (not ``--jobs``,
    ``--out``, ``--report``), ``--budget`` always: the report's first line, to rerun it."""
    parts = ["python bench/learning.py", f"--budget {args.budget}"]
    for action in ap._actions:
        if not action.option_strings or action.dest in ("help", "budget", "jobs", "out", "report"):
            continue
        value, default = getattr(args, action.dest), action.default
        if isinstance(default, str) and action.type:
            default = action.type(default)  # as argparse converts a string default
        if value == default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            sep = " " if action.nargs == "*" else ","
            parts.append(f"{flag} " + sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in value))
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def figure_name(report: Path, what: str) -> str:
    """A report's figure file, named after it so that reports in one folder keep their own (LEARNING.md:
    learning_curves.png, LEARNING_medium.md: learning_medium_curves.png)."""
    return f"{report.stem.lower()}_{what}.png"


def write_report(path: Path, results: list[dict], trials: dict, args, budget: dict, chances: dict, versions: dict,
                 sketches: dict | None, wall_s: float, reuse: str) -> None:
    ok = [r for r in results if "error" not in r]
    arms = list(dict.fromkeys(r["name"] for r in results))
    tasks = sorted({r["task"] for r in results}, key=list(TASKS).index)
    every = [*results, *(r for rs in trials.values() for r in rs)]  # seed 0 at the chosen rate is in both
    jobs_run = {(r["name"], r["task"], r["seed"], r["lr"]): r for r in every}.values()
    base = budget["base"]
    start = ("the tiny base that sees (`vlatent pretrain-base`: " + ", ".join(
        f"{k} {v:.3f}" for k, v in (base["perception"] or {}).items()) + " of held-out cells read right)"
             if base["kind"] != "random" else "random tiny bases (one per seed)")
    lines = ["# Learning benchmark", "",
             f"`{args.command}` ({budget['device_note']}, "
             f"{len(args.seeds)} seeds, {budget['examples']} training examples seen per arm, every arm fine-tuned "
             f"whole from {start}). Compute: {sum(r.get('total_s', 0) for r in jobs_run) / 60:.1f} job-minutes "
             f"incl. the learning-rate trials (jobs run {args.jobs} at a time; this invocation took "
             f"{wall_s / 60:.1f} min wall-clock, {reuse}).", "",
             f"Base: `{base['path']}`, {base['seconds']:.0f} s in this invocation"
             + (f" (pretraining it took {base['pretrain_minutes']} min on 2 cores when it was built)"
                if base["pretrain_minutes"] else "") + ".", "",
             f"Tasks: {'; '.join(f'{t} `' + ' '.join(TASKS[t]) + f'` (builder version {versions[t]})' for t in tasks)} "
             "(`vlatent build-data TASK`, "
             f"{budget['n']} examples, seed 0, 80/10/10 split).", "",
             "Test accuracy, mean ± std over seeds; in brackets the same models on a test set built with a seed the "
             f"bench never uses otherwise ({budget['fresh_n']} examples, seed {FRESH_SEED}). Chance: uniform over "
             "the answers that occur / always the most frequent answer.", "",
             "| arm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks),
             "| chance | " + " | ".join(f"{chances[t][0]:.2f} / {chances[t][1]:.2f}" for t in tasks) + " |"]
    for arm in arms:
        cells = []
        for t in tasks:
            rs = [r for r in ok if r["name"] == arm and r["task"] == t]
            fresh = mean_std([r["fresh_accuracy"] for r in rs if "fresh_accuracy" in r])
            cells.append(mean_std([r["accuracy"] for r in rs]) + (f" [{fresh}]" if rs and fresh != "—" else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Latent arms against text chain of thought", "",
              "Test accuracy of each latent arm minus `text_cot`'s on the same task (mean over seeds); \"clears\" "
              "when the difference is larger than the standard deviation of both arms.", "",
              "| arm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for arm in arms:
        if arm.startswith("text") or not any(r["interventions"] for r in ok if r["name"] == arm):
            continue
        cells = []
        for t in tasks:
            mine = [r["accuracy"] for r in ok if r["name"] == arm and r["task"] == t]
            cot = [r["accuracy"] for r in ok if r["name"] == "text_cot" and r["task"] == t]
            if not mine or not cot:
                cells.append("—")
                continue
            diff = statistics.mean(mine) - statistics.mean(cot)
            sd = max(statistics.stdev(x) if len(x) > 1 else 0.0 for x in (mine, cot))
            cells.append(f"{diff:+.3f}" + (" (clears)" if abs(diff) > sd else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Are the latents used?", "",
              "Accuracy of each latent arm's unmodified run against the same run with every latent replaced as it is "
              "fed back (`vlatent.analysis.intervene`): zeros, another test example's latents, Gaussian noise of the "
              "same norm; \"changed\" is the share of answers whose text changed; \"latent rate\" the share of "
              "answers that reasoned in latents at all; \"alike\" the mean cosine between different examples' "
              "latents at the same step (`vlatent.analysis.generated_specificity`; near 1: every example gets the same "
              "latents, so a swap has nothing to change); \"donor's\" the swapped run judged against the donor "
              "example's answer (latents that carry their example make the answer the donor's: this nears the "
              "unmodified accuracy while the swap column falls).", "",
              "| arm | task | accuracy | zero | swap | donor's | noise | changed (zero/swap/noise) | latent rate | "
              "alike |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for t in tasks:
            rs = [r for r in ok if r["name"] == arm and r["task"] == t and r["interventions"]]
            if not rs:
                continue
            cell = {m: mean_std([r["interventions"][m]["accuracy"] for r in rs]) for m in INTERVENTIONS}
            chg = "/".join(f"{statistics.mean(r['interventions'][m]['changed'] for r in rs):.2f}"
                           for m in INTERVENTIONS)
            across = [r["latent_across"] for r in rs if "latent_across" in r]  # results before it was measured: —
            alike = f"{statistics.mean(across):.3f}" if across else "—"
            donors = mean_std([r["interventions"]["swap"]["donor_accuracy"] for r in rs
                               if "donor_accuracy" in r["interventions"]["swap"]])  # results before it: —
            lines.append(f"| {arm} | {t} | {mean_std([r['accuracy'] for r in rs])} | {cell['zero']} | {cell['swap']} "
                         f"| {donors} | {cell['noise']} | {chg} | {statistics.mean(r['latent_rate'] for r in rs):.2f} "
                         f"| {alike} |")
    traced = [(arm, t, rs) for arm in arms for t in tasks
              for rs in [[r["trace"] for r in ok if r["name"] == arm and r["task"] == t and r.get("trace")]]
              if any(x["start"] or x["steps"] for x in rs)]  # an arm that writes no cell sentence has no row
    if traced:
        lines += ["", "## What the traces get right", "",
                  "Each test output's sentences that name a grid cell against its record's reference trace "
                  "(`meta.text_cot`, `vlatent.analysis.trace`), in order: the start cell it names (reading the "
                  "picture), the later steps right in their place (the walk), the whole walk exact; mean over seeds.",
                  "", "| arm | task | start | steps | whole walk |", "|---|---|---|---|---|"]
        for arm, t, rs in traced:
            steps = [x["steps"] for x in rs if x["steps"] is not None]
            lines.append(f"| {arm} | {t} | {mean_std([x['start'] for x in rs])} | {mean_std(steps)} "
                         f"| {mean_std([x['exact'] for x in rs])} |")
    lines += ["", "## Cost and settings", "",
              ("Learning rate: seed 0 trained at every rate of the arm's grid, the best on the val split "
               f"({budget.get('val_examples') or 'all'} examples) kept (ties: the first listed) and only it scored "
               "on test; the other seeds at that rate." if args.tune else
               "Learning rate: the first of the arm's grid for every seed (`--no-tune`).")
              + " Job s: training, evaluation and interventions.", "",
              "| arm | task | examples seen | train s (mean) | job s (mean) | learning rate "
              "| val accuracy per rate (seed 0) | latent mode |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for t in tasks:
            rs = [r for r in ok if r["name"] == arm and r["task"] == t]
            if rs:
                val = ", ".join(f"{r['lr']:g}: {r['val_accuracy']:.3f}" for r in
                                sorted(trials.get((arm, t), []), key=lambda r: -r["lr"]) if "val_accuracy" in r)
                seconds = [statistics.mean(r[k] for r in rs) for k in ("train_s", "total_s")]
                lines.append(f"| {arm} | {t} | {rs[0]['examples_seen']} | {seconds[0]:.0f} | {seconds[1]:.0f} "
                             f"| {rs[0]['lr']:g} | {val or 'not tuned'} | {rs[0].get('latent', '—')} |")
    if sketches and "error" not in sketches:
        m = sketches["metrics"]
        lines += ["", f"## {sketches['name']}'s sketches ({sketches['task']}, seed {sketches['seed']})", "",
                  f"A sketch decoder trained for the arm's final ViT on {m['train_images']} training helper images; "
                  f"{m['held_out_images']} held-out ones decoded from their ViT features: "
                  + ", ".join(f"{k} {v:g}" for k, v in m["decoded_from_features"].items())
                  + " (VAE round trip, the bound: " + ", ".join(f"{k} {v:g}" for k, v in m["vae_round_trip"].items())
                  + ").",
                  *drawn_line(sketches.get("drawn")),
                  *forced_lines(sketches.get("teacher_forced")),
                  "Test examples: the input, then per latent step the true helper image and the sketch the model drew "
                  f"(latent segments generated per example: {sketches['segments']}).", "",
                  f"![sketches]({Path(sketches['sketches']).name})", "",
                  f"![decoder reconstructions]({Path(sketches['reconstructions']).name})"]
    lines += ["", "## Reading", ""] + reading(ok, arms, tasks, chances, budget)
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["", "## Failed jobs", ""] + [f"- {r['name']} / {r['task']} / seed {r['seed']}: {r['error']}"
                                               for r in failed]
    lines += ["", f"![learning curves]({figure_name(path, 'curves')})", ""]
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else ""
    path.write_text("\n".join(lines) + ("\n" + notes if notes else ""))


def reading(ok: list[dict], arms: list[str], tasks: list[str], chances: dict, budget: dict) -> list[str]:
    """Plain statements read off the tables: who beats the majority-answer baseline, whose latents matter."""
    out = []
    for t in tasks:
        majority = chances[t][1]
        for arm in arms:
            accs = [r["accuracy"] for r in ok if r["name"] == arm and r["task"] == t]
            if not accs:
                continue
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            mean = statistics.mean(accs)
            verdict = "beats" if mean - sd > majority + 0.02 else "does not beat"
            out.append(f"- {arm} on {t}: {mean:.3f} {verdict} always answering the most frequent answer "
                       f"({majority:.2f}).")
        for arm in arms:
            rs = [r for r in ok if r["name"] == arm and r["task"] == t and r["interventions"]]
            if not rs:
                continue
            rate = statistics.mean(r["latent_rate"] for r in rs)
            moved = max(abs(statistics.mean(r["interventions"][m]["accuracy"] for r in rs)
                            - statistics.mean(r["accuracy"] for r in rs)) for m in INTERVENTIONS)
            if rate < 0.5:
                out.append(f"- {arm} on {t}: reasons in latents in only {rate:.0%} of its answers: the intervention "
                           "says little.")
            elif moved < 0.02:
                out.append(f"- {arm} on {t}: accuracy does not move when its latents are zeroed, swapped or noised: "
                           "it is not reasoning through its latents.")
            elif statistics.mean(r["accuracy"] for r in rs) - chances[t][1] > 0.02:
                out.append(f"- {arm} on {t}: replacing its latents moves accuracy by up to {moved:.3f}: the answers "
                           "depend on them.")
            else:
                out.append(f"- {arm} on {t}: replacing its latents moves accuracy by up to {moved:.3f}, but the run "
                           "does not beat the majority answer: the latents steer the output without carrying the "
                           "answer.")
    goals = {arm: sum(statistics.mean(r["accuracy"] for r in ok if r["name"] == arm and r["task"] == t)
                      >= chances[t][1] + 0.15 for t in tasks if any(r["name"] == arm and r["task"] == t for r in ok))
             for arm in arms}
    out.append("- Beats the majority answer by 0.15 or more (mean test accuracy): "
               + ", ".join(f"{arm} on {n} of {sum(any(r['name'] == arm and r['task'] == t for r in ok) for t in tasks)}"
                           for arm, n in goals.items()) + ".")
    base = budget["base"]
    out.append(f"- Settings: {budget['examples']} examples seen per arm, batch {budget['batch']}, "
               f"{budget['n']} examples built per task (80% train), the learning rates of the cost table, cosine "
               "schedule, every arm trained whole from "
               + (f"the pretrained tiny base ({base['config']})" if base["kind"] != "random" else
                  "random tiny bases" + (f" ({budget['backbone']})" if budget["backbone"] else "")) + ".")
    return out


def plot_curves(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    tasks = list(dict.fromkeys(r["task"] for r in ok))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.4), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for arm in dict.fromkeys(r["name"] for r in ok if r["task"] == task):
            curves = [r["history"] for r in ok if r["name"] == arm and r["task"] == task]
            xs = [x for x, _ in curves[0]]
            ys = [statistics.mean(c[i][1] for c in curves if i < len(c)) for i in range(len(xs))]
            ax.plot(xs, ys, label=arm, linewidth=1.2)
        ax.set_title(task)
        ax.set_xlabel("training examples seen")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own so that `command_line` can be tested on it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", choices=list(BUDGETS), default="small")
    ap.add_argument("--arms-dir", default=str(ARMS_DIR), help="folder of arm YAMLs (default: %(default)s)")
    ap.add_argument("--arms", help="comma-separated arm names (default: every YAML in --arms-dir)")
    ap.add_argument("--method-config", nargs="*", default=[], metavar="KEY=VALUE",
                    help="set in every stage's method_config of every arm run, e.g. latent_bottleneck=true (the jobs' "
                         "folders are named ARM+KEY=VALUE, beside the plain arm's)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                    help="train seed 0 at every learning rate of the arm's grid and keep the best on the val split "
                         "(default); --no-tune: the grid's first rate")
    ap.add_argument("--jobs", type=int, default=2, help="jobs run at the same time (one process each)")
    ap.add_argument("--examples", type=int, help="override the budget's training examples per arm")
    ap.add_argument("--n", type=int, help="override the budget's examples built per task")
    ap.add_argument("--batch", type=int, help="override the budget's batch size (its examples stay the same)")
    ap.add_argument("--learning-rates", type=lambda s: [float(x) for x in s.split(",")],
                    help="override every arm's grid, e.g. 1e-3 (diagnostic runs)")
    ap.add_argument("--base", default="pretrained",
                    help="what every arm starts from: 'pretrained' (the tiny base that sees, vlatent.testing."
                         "pretrained_base; built on first use), 'random' (vlatent.testing.build_tiny_base, random "
                         "weights, one per seed; diagnostics) or a base model folder")
    ap.add_argument("--backbone", nargs="*", default=[], metavar="KEY=VALUE",
                    help="with --base random: override the tiny backbone, e.g. vision_depth=4")
    ap.add_argument("--out", default=str(ROOT / "runs" / "learning"))
    ap.add_argument("--report", default=str(ROOT / "bench" / "LEARNING.md"))
    return ap


def main() -> int:
    ap = build_parser()
    args = ap.parse_args()
    args.command = command_line(ap, args)
    # one thread per job (--jobs of them share the cores), offline: set before the job server starts
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(PRELOAD)

    from train.pretrain_base import commit
    from vlatent.testing import build_tiny_base, pretrained_base

    t0 = time.time()
    # absolute: a job's stage recipes live in its folder, and a recipe's relative paths resolve against the recipe file
    budget, root, report = dict(BUDGETS[args.budget]), Path(args.out).resolve(), Path(args.report)
    budget.update({k: v for k, v in (("examples", args.examples), ("n", args.n), ("batch", args.batch))
                   if v})
    budget["backbone"] = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.backbone)}
    if budget["backbone"] and args.base != "random":
        raise SystemExit("error: --backbone overrides the random tiny backbone: use it with --base random")
    names = args.arms.split(",") if args.arms else sorted(p.stem for p in Path(args.arms_dir).glob("*.yaml"))
    arms = {name: load_arm(name, args.arms_dir) for name in names}
    override_method_config(arms, args.method_config)
    if args.learning_rates:
        for arm in arms.values():
            arm["learning_rates"] = args.learning_rates
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"error: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    data = {t: build_task(t, root, budget["n"]) for t in tasks}
    budget["fresh_n"] = max(10, budget["n"] // 10)
    fresh = {t: build_task(t, root, budget["fresh_n"], seed=FRESH_SEED, split="0,0,1", name="fresh") for t in tasks}
    base_t0 = time.time()
    if args.base == "random":
        bases = {s: str(build_tiny_base(root / "bases" / f"seed{s}", seed=s, **budget["backbone"]))
                 for s in args.seeds}
    else:
        base = pretrained_base() if args.base == "pretrained" else Path(args.base)
        bases = {s: str(base) for s in args.seeds}
    budget["base"] = base_info(bases[args.seeds[0]], args.base, time.time() - base_t0)
    pairs = [(name, t) for name, arm in arms.items() for t in tasks if t in arm["tasks"]]
    for name, t in pairs:
        prepare(arms[name], data[t])
    grid = {name: arm["learning_rates"] if args.tune else arm["learning_rates"][:1] for name, arm in arms.items()}

    overrides = "".join(f"+{kv}" for kv in args.method_config)  # beside the plain arm's folders, not over them
    revision = commit()

    def job(name, task, seed, lr):
        trial = args.tune and seed == args.seeds[0]  # scored on val; on test once val picks it
        return {"name": name, "arm": arms[name], "task": task, "seed": seed, "lr": lr, "budget": budget,
                "split": "val" if trial else "test",
                "data": str(data[task]), "fresh": str(fresh[task]), "base": bases[seed],
                "out": str(root / "runs" / (name + overrides) / task / f"seed{seed}" / f"lr{lr:g}"), "commit": revision,
                "cost": arms[name].get("cost", 1) * TASK_COST.get(task, 1)}

    trials, chosen = {}, {}

    def then(result: dict) -> list[dict]:
        status = result.get("error") or ", ".join(f"{k} {result[k]:.3f}" for k in ("val_accuracy", "accuracy")
                                                  if k in result) or "done"
        print(f"{result['name']:>12} {result['task']:>7} seed {result['seed']} lr {result['lr']:g}: {status}",
              flush=True)
        key = (result["name"], result["task"])
        if result.get("kind") in ("sketches", "test") or result["seed"] != args.seeds[0]:
            return []
        trials.setdefault(key, []).append(result)
        ok = [r for r in trials[key] if "error" not in r]
        if len(trials[key]) < len(grid[key[0]]) or not ok:
            return []
        lrs = grid[key[0]]  # ties go to the rate listed first
        best = max(ok, key=lambda r: (r.get("val_accuracy", 0.0), -lrs.index(r["lr"])))
        chosen[key] = best["lr"]
        more = [job(key[0], key[1], s, best["lr"]) for s in args.seeds[1:]] if args.tune else []
        if args.tune:
            more.append({"kind": "test", **{k: best[k] for k in ("name", "task", "seed", "lr")}, "commit": revision,
                         "arm": arms[key[0]], "data": str(data[key[1]]), "fresh": str(fresh[key[1]]),
                         "model": best["stages"][-1],
                         "cost": arms[key[0]].get("cost", 1) * TASK_COST.get(key[1], 1) / 4,
                         "out": str(Path(best["stages"][-1]).parent / "test")})
        figure = arms[key[0]].get("figure")
        if figure and figure["task"] == key[1]:
            more.append({"kind": "sketches", "name": key[0], "task": key[1], "seed": best["seed"], "lr": best["lr"],
                         "commit": revision,
                         "figure": figure, "data": str(data[key[1]]), "model": best["stages"][-1],
                         **eval_settings(arms[key[0]], key[1]), "cost": 100,
                         "out": str(Path(best["stages"][-1]).parent / "sketches"),
                         "figure_out": str(report.parent / figure_name(report, "sketches"))})
        return more

    # tuned, the other seeds wait for val to pick the rate; not tuned, every seed starts at once
    first = [job(name, t, seed, lr) for name, t in pairs for lr in grid[name]
             for seed in (args.seeds[:1] if args.tune else args.seeds)]
    done = run_all(first, args.jobs, then, mp)
    results = [r for r in done if r.get("kind") is None and chosen.get((r["name"], r["task"])) == r["lr"]]
    results += [r for r in done if "error" in r and ((r["name"], r["task"]) not in chosen
                                                     or r.get("kind") == "sketches")]
    for extra in (r for r in done if r.get("kind") == "test"):
        trial = next(r for r in results if r.get("kind") is None and r["seed"] == extra["seed"]
                     and (r["name"], r["task"], r["lr"]) == (extra["name"], extra["task"], extra["lr"]))
        if "error" in extra:  # reported as the trial's failure; its val column stays in the cost table
            trial["error"] = extra["error"]
            continue
        trial["total_s"] += extra["total_s"]
        trial.update({k: extra[k] for k in ("accuracy", "fresh_accuracy", "latent", "interventions", "latent_rate",
                                             "latent_across")
                      if k in extra})
    for r in results:
        if "error" not in r:
            r["trace"] = trace_check(r, data[r["task"]])
    sketches = next((r for r in done if r.get("kind") == "sketches"), None)
    versions = {t: json.loads((data[t] / "dataset_info.json").read_text())["version"] for t in tasks}
    write_report(report, results, trials, args, budget, {t: chance(data[t]) for t in tasks}, versions, sketches,
                 time.time() - t0, reused(done, revision))
    plot_curves(report.parent / figure_name(report, "curves"), results)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
