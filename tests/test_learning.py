"""bench/learning.py: the arms' record views, and one small end-to-end job (train 2 stages, evaluate, intervene)."""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import learning  # noqa: E402
from data_builders import depth  # noqa: E402
from vlatent.data import RecordError, present, write_view  # noqa: E402

RECORD = {"id": "r", "images": ["q.png", "h.png"], "answer": "B", "task": "maze",
          "meta": {"text_cot": "Start at row 1. Go left. The answer is B."}, "messages": [
    {"role": "user", "content": [{"type": "image", "image": 0}, {"type": "text", "text": "Which way?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Sketch."}, {"type": "latent", "image": 1},
                                      {"type": "text", "text": "Left turn. The answer is B."}]}]}


def test_task_data_built_with_other_arguments_is_rebuilt_and_its_jobs_dropped(tmp_path, monkeypatch):
    monkeypatch.setitem(learning.TASKS, "depth", [])
    data = learning.build_task("depth", tmp_path, n=10)
    kept, stale = tmp_path / "runs" / "text_direct" / "maze", tmp_path / "runs" / "text_direct" / "depth"
    for folder in (kept, stale):
        folder.mkdir(parents=True)
        (folder / "result.json").write_text("{}")
    first = (data / "train.jsonl").stat().st_mtime_ns
    assert learning.build_task("depth", tmp_path, n=10) == data and (data / "train.jsonl").stat().st_mtime_ns == first
    assert stale.is_dir()  # same arguments: reused

    monkeypatch.setitem(learning.TASKS, "depth", ["--marker", "24"])
    learning.build_task("depth", tmp_path, n=10)
    info = json.loads((data / "dataset_info.json").read_text())
    assert info["arguments"]["marker"] == 24
    assert not stale.exists() and (kept / "result.json").is_file()  # only the rebuilt task's jobs go

    stale.mkdir(parents=True)  # the folder is from another version of the builder (its records changed): rebuilt
    before = (data / "train.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(depth, "VERSION", depth.VERSION + 1)
    learning.build_task("depth", tmp_path, n=10)
    assert (data / "train.jsonl").stat().st_mtime_ns != before and not stale.exists()

def test_record_views():
    assert present([RECORD], "as_built") == [RECORD]
    direct = present([RECORD], "answer_only")[0]
    assert direct["messages"][-1]["content"] == [{"type": "text", "text": "The answer is B."}]
    with pytest.raises(RecordError, match="record 'r': meta.text_cot: is missing"):
        present([{**RECORD, "meta": {}}], "text_cot")
    cot = present([RECORD], "text_cot")[0]  # the written-out reasoning, not the latent record's filler
    assert cot["messages"][-1]["content"] == [{"type": "text", "text": "Start at row 1. Go left. The answer is B."}]
    assert cot["messages"][0] == RECORD["messages"][0] and cot["images"] == RECORD["images"]
    obs = present([RECORD], "observations")[0]["messages"][-1]["content"]
    assert [item.get("observation", False) for item in obs] == [False, False, True, False]
    assert [item.get("text") for item in obs[2:]] == ["Left turn.", " The answer is B."]  # the answer is not observed
    assert "observation" not in RECORD["messages"][-1]["content"][2]  # the original is left alone
    with pytest.raises(ValueError, match="record view 'images_only'"):
        present([RECORD], "images_only")


def test_write_view_writes_the_view_once_beside_train_jsonl(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(RECORD) + "\n")
    assert write_view(tmp_path, "as_built") == tmp_path / "train.jsonl"
    path = write_view(tmp_path, "answer_only")
    assert path == tmp_path / "train.answer_only.jsonl"
    assert json.loads(path.read_text())["messages"][-1]["content"] == [{"type": "text", "text": "The answer is B."}]
    assert json.loads(path.read_text())["images"] == ["q.png", "h.png"]  # paths stay relative to the folder
    stamp = path.stat().st_mtime_ns
    assert write_view(tmp_path, "answer_only") == path and path.stat().st_mtime_ns == stamp  # reused
    # a rebuilt dataset (train.jsonl newer than the view) is seen afresh, not through the stale view
    (tmp_path / "train.jsonl").write_text(json.dumps({**RECORD, "answer": "C"}) + "\n")
    os.utime(tmp_path / "train.jsonl", ns=(stamp + 10**9, stamp + 10**9))
    assert json.loads(write_view(tmp_path, "answer_only").read_text())["messages"][-1]["content"][0]["text"] \
        == "The answer is C."


def test_every_arm_recipe_loads():
    for path in sorted(learning.ARMS_DIR.glob("*.yaml")):
        arm = learning.load_arm(path.stem)
        assert set(arm["tasks"]) <= set(learning.TASKS) and arm["stages"], path
        assert abs(sum(s["share"] for s in arm["stages"]) - 1) < 0.02, path


def test_method_config_override_reaches_every_stage_and_the_fingerprint():
    """``--method-config latent_bottleneck=true``: set (as a YAML bool) in each stage of each arm run, and the jobs'
    fingerprints change with it, so a plain run's results in the same folder are not reused for it."""
    arms = {name: learning.load_arm(name) for name in ("mirage", "monet")}
    job = {"name": "mirage", "arm": copy.deepcopy(arms["mirage"]), "task": "vsp", "seed": 0, "lr": 1e-3}
    learning.override_method_config(arms, ["latent_bottleneck=true", "num_latent_tokens=8"])
    assert [s["method_config"]["latent_bottleneck"] for a in arms.values() for s in a["stages"]] == [True] * 5
    assert all(s["method_config"]["num_latent_tokens"] == 8 for a in arms.values() for s in a["stages"])
    assert learning.fingerprint(job) != learning.fingerprint({**job, "arm": arms["mirage"]})
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        learning.override_method_config(arms, ["latent_bottleneck"])


def hit_rate(eval_dir: Path) -> float:
    """The fraction of an evaluation's prediction rows marked correct."""
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert rows and (eval_dir / "scores.json").is_file()
    return sum(bool(r["correct"]) for r in rows) / len(rows)


def test_score_drawn_pairs_each_sketch_with_its_own_step_and_the_next_examples(tmp_path):
    """Path IoU pooled over sketches, by hand: a half-drawn path (32 of 64 path pixels) and an exact one score
    (32 + 64) / (64 + 64) against their own helper images and 0 against the next example's (disjoint paths)."""
    from PIL import Image, ImageDraw
    blue = (40, 100, 230)

    def picture(name, box):  # 16 px, white, the path a filled rectangle
        im = Image.new("RGB", (16, 16), "white")
        ImageDraw.Draw(im).rectangle(box, fill=blue)
        im.save(tmp_path / name)
        return im

    top, half, low = (0, 0, 15, 3), (0, 0, 7, 3), (0, 8, 15, 11)  # 64, 32 and 64 pixels
    truth = [[str(tmp_path / "a.png")], [str(tmp_path / "b.png"), str(tmp_path / "c.png")]]
    picture("a.png", top), picture("c.png", top)
    drawn = [[picture("half.png", half)], [picture("b.png", low)]]  # example 1 drew step 1 only
    scores = learning.score_drawn(drawn, truth, blue, 16)
    assert scores["own"]["sketches"] == 2 and scores["own"]["path_iou"] == pytest.approx(96 / 128)
    # next example's step: half vs b.png (low): 0 / 96; b.png vs a.png (top): 0 / 128
    assert scores["other"]["sketches"] == 2 and scores["other"]["path_iou"] == 0
    assert scores["own"]["psnr"] > scores["other"]["psnr"]
    assert "path_iou 0.75" in learning.drawn_line(scores)[0]
    assert learning.score_drawn([[], []], truth, blue, 16)["own"] is None


@pytest.mark.slow
def test_one_arm_end_to_end(tmp_path):
    """sketchpad on maze, 2 seeds: seed 0 at both learning rates (val + test), seed 1 at the one val picked, the
    intervention columns, and the sketch figure (its decoder trained for a few steps only)."""
    arm = learning.load_arm("sketchpad")
    decoder = arm["figure"]["decoder"]
    for flag in ("--vae-steps", "--aligner-steps"):
        decoder[decoder.index(flag) + 1] = "3"
    for stage, share in zip(arm["stages"], (0.75, 0.25)):  # 3 + 1 steps of 8: the 32 examples split exactly
        stage["share"] = share
    arms = tmp_path / "arms"
    arms.mkdir()
    (arms / "sketchpad.yaml").write_text(yaml.safe_dump(arm))
    cmd = [sys.executable, str(ROOT / "bench" / "learning.py"), "--arms-dir", str(arms), "--tasks", "maze",
           "--seeds", "0,1", "--examples", "32", "--n", "30", "--jobs", "2", "--out", "runs",  # relative to cwd
           "--report", str(tmp_path / "LEARNING.md")]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=600)
    runs = tmp_path / "runs/runs/sketchpad/maze"
    trials = [json.loads((runs / f"seed0/lr{lr:g}/result.json").read_text()) for lr in arm["learning_rates"]]
    assert all("accuracy" not in t for t in trials)  # tuning never sees test
    for t in trials:  # each accuracy is its own predictions' hit rate
        assert t["val_accuracy"] == pytest.approx(hit_rate(runs / f"seed0/lr{t['lr']:g}/eval_val"))
    chosen = max(trials, key=lambda t: (t["val_accuracy"], -arm["learning_rates"].index(t["lr"])))["lr"]
    assert [p.name for p in (runs / "seed1").iterdir()] == [f"lr{chosen:g}"]
    result = json.loads((runs / f"seed1/lr{chosen:g}/result.json").read_text())
    assert result["examples_seen"] == 32 and "val_accuracy" not in result
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert result["commit"].startswith(head)  # "+dirty" after it when the checkout has changes
    assert set(result["interventions"]) == {"zero", "swap", "noise"}
    assert 0 <= result["interventions"]["swap"]["donor_accuracy"] <= 1
    # seed 0's test split and interventions: a job of their own, for the rate val picked only
    picked = json.loads((runs / f"seed0/lr{chosen:g}/test/result.json").read_text())
    assert picked["accuracy"] == pytest.approx(hit_rate(runs / f"seed0/lr{chosen:g}/test/eval_test"))
    assert set(picked["interventions"]) == {"zero", "swap", "noise"} and 0 <= picked["latent_rate"] <= 1
    if picked["latent_rate"] > 0.2:  # several examples with latents: how alike they are is measured
        assert -1 <= picked["latent_across"] <= 1
    assert [p.parent.name for p in runs.glob("seed0/*/test")] == [f"lr{chosen:g}"]
    report = (tmp_path / "LEARNING.md").read_text()
    assert "| sketchpad | maze |" in report and "| chance |" in report and "val accuracy per rate" in report
    assert "| swap | donor's | noise |" in report and "| latent rate | alike |" in report
    assert "sketchpad's sketches (maze, seed 0)" in report
    assert "The model's own sketches (" in report or "drew no whole sketch on the 3 scored" in report
    assert "Given the true earlier steps (the true sketches in the latent slots and in the head's context)" in report
    assert "Its head's first sketches alone, with no earlier sketch in its context" in report
    for png in ("learning_curves.png", "learning_sketches.png", "learning_sketches_reconstructions.png"):
        assert (tmp_path / png).stat().st_size > 1000, png

    # a rerun reuses every finished job; a changed arm reruns the jobs it touches
    stamp = (runs / "seed1" / f"lr{chosen:g}" / "result.json").stat().st_mtime
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=600)
    assert (runs / "seed1" / f"lr{chosen:g}" / "result.json").stat().st_mtime == stamp
    assert "reusing 5 of 5 finished jobs, all made at this commit" in (tmp_path / "LEARNING.md").read_text()
    arm["eval"]["max_new_tokens"] = {"default": 40, "maze": 30}
    (arms / "sketchpad.yaml").write_text(yaml.safe_dump(arm))
    before = time.time()
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=600)
    for seed in ("seed0", "seed1"):  # seed 1: at whichever rate val picks now
        newest = max((runs / seed).glob("lr*/result.json"), key=lambda p: p.stat().st_mtime)
        assert newest.stat().st_mtime > before
        # a job keeps the settings resolved for its own task, so another task's edit cannot rerun it
        assert json.loads(newest.read_text())["job"]["arm"]["eval"]["max_new_tokens"] == 30


def test_train_throughput_times_one_arm(tiny_base, tmp_path):
    """bench/train_throughput.py's per-arm run (the process each method's row comes from) on Monet's observed view of
    a few maze records: one timed step, and the batch it timed is the view's (its tokens counted by hand)."""
    subprocess.run([sys.executable, "-m", "data_builders.maze", "--out", str(tmp_path / "maze"), "--n", "4", "--size",
                    "4", "--seed", "0"], check=True, cwd=ROOT, capture_output=True)
    arm = json.dumps([str(tiny_base), str(tmp_path / "maze/train.jsonl"), str(tmp_path), "monet", {"stage": 1}])
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--arm", arm, "--batch", "2",
                          "--steps", "1"], check=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["step_s"] > 0 and row["samples_per_s"] == pytest.approx(2 / row["step_s"])
    from vlatent.data import load_records
    from vlatent.model import LatentVLM

    model = LatentVLM.from_pretrained(tiny_base, method="monet", stage=1)
    batch = model.collator()(present(load_records(tmp_path / "maze/train.jsonl")[:2], "observations"))
    assert row["tokens"] == int(batch["attention_mask"].sum())


def test_untuned_seeds_start_together(tmp_path):
    """--no-tune: no seed waits for another (nothing is picked on val), so with 2 workers seed 1 starts before seed 0
    has finished, and both are scored on test at the grid's first rate. With --method-config the jobs' folders are
    named for it (a plain run's beside them stays) and the report's command says it."""
    cmd = [sys.executable, str(ROOT / "bench" / "learning.py"), "--arms", "text_direct", "--tasks", "depth",
           "--no-tune", "--seeds", "0,1", "--examples", "16", "--n", "30", "--jobs", "2", "--out", "runs",
           "--method-config", "num_latent_tokens=4", "--report", str(tmp_path / "LEARNING.md")]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=600)
    lr = learning.load_arm("text_direct")["learning_rates"][0]
    jobs = {s: tmp_path / f"runs/runs/text_direct+num_latent_tokens=4/depth/seed{s}/lr{lr:g}" for s in (0, 1)}
    results = {s: json.loads((job / "result.json").read_text()) for s, job in jobs.items()}
    assert all("accuracy" in r and "val_accuracy" not in r for r in results.values())
    for first, second in ((0, 1), (1, 0)):  # each began training before the other one's result was written
        assert (jobs[first] / "stage0.yaml").stat().st_mtime < (jobs[second] / "result.json").stat().st_mtime
    report = (tmp_path / "LEARNING.md").read_text()
    assert "not tuned" in report and "the first of the arm's grid for every seed" in report
    assert report.splitlines()[2].startswith(
        "`python bench/learning.py --budget small --arms text_direct --method-config num_latent_tokens=4 --tasks depth "
        "--seeds 0,1 --no-tune --examples 16 --n 30` (")


def test_the_swap_judged_against_its_donor(mirage_model, tmp_path):
    """The donor's column judges each swapped run against the example whose latents it was fed (the next one). Each
    test record's answer is set to what the model itself answers (its last word), so the unmodified accuracy is 1.
    Under the latent bottleneck a swapped run goes on exactly as its donor's, so it answers the donor's question:
    donor's accuracy 1 and swap accuracy the share of neighbours whose answers agree; without the option the runs
    differ from their donors'."""
    from eval.benchmarks import answer_text, extract_answer, get_benchmark, load_examples
    from eval.run import latent_kwargs

    subprocess.run([sys.executable, "-m", "data_builders.maze", "--out", str(tmp_path), "--n", "40",
                    *learning.TASKS["maze"]], check=True, cwd=ROOT, capture_output=True)  # free-form answers
    settings = {"max_new_tokens": 10, "latent": "on"}
    blind = copy.deepcopy(mirage_model)
    blind.method.config.latent_bottleneck = True
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").open()]
    examples = load_examples(get_benchmark("maze"), tmp_path, "test")  # the prompts the bench generates from
    runs = blind.generate([ex.open_images() for ex in examples], [ex.prompt for ex in examples],
                          max_new_tokens=settings["max_new_tokens"], **latent_kwargs(blind, "on"))
    answers = [extract_answer(answer_text(g.text)) for g in runs]  # what the judge reads
    assert len(test) >= 3 and all(answers)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({**r, "answer": a}) + "\n" for r, a in zip(test, answers)))

    scores = learning.intervention_scores(blind, "maze", str(tmp_path), settings, seed=0)["interventions"]["swap"]
    agree = sum(answers[i] == answers[(i + 1) % len(answers)] for i in range(len(answers))) / len(answers)
    assert scores["donor_accuracy"] == 1.0 and scores["accuracy"] == pytest.approx(agree)
    plain = learning.intervention_scores(mirage_model, "maze", str(tmp_path), settings, seed=0)
    assert plain["interventions"]["swap"]["donor_accuracy"] < 1.0


def test_the_reports_command_has_every_option_that_changes_a_result():
    ap = learning.build_parser()
    args = ap.parse_args(["--budget", "medium", "--arms-dir", "runs/arms", "--method-config", "latent_bottleneck=true",
                          "stage=2", "--seeds", "0,1", "--learning-rates", "1e-3,3e-4", "--jobs", "4", "--out", "x"])
    assert learning.command_line(ap, args) == (
        "python bench/learning.py --budget medium --arms-dir runs/arms --method-config latent_bottleneck=true stage=2 "
        "--seeds 0,1 --learning-rates 0.001,0.0003")  # --jobs and --out change no result
    assert learning.command_line(ap, ap.parse_args([])) == "python bench/learning.py --budget small"
    args = ap.parse_args(["--tune", "--tasks", ",".join(learning.TASKS), "--base", "random", "--backbone", "a=1"])
    assert learning.command_line(ap, args) == "python bench/learning.py --budget small --base random --backbone a=1"


def test_reused_jobs_name_the_commits_that_made_them():
    """A reused result ran the code of its own commit (fingerprints hold settings, not code): the report says which."""
    done = [{"reused": True, "commit": "a1"}, {"reused": True, "commit": "b2"}, {"reused": True}, {"commit": "b2"}]
    assert learning.reused(done, "b2") == ("reusing 3 of 4 finished jobs, made at a1 (1), b2 (1), an unrecorded "
                                           "commit (1); this is b2")
    assert learning.reused(done[1:2] + done[3:], "b2") == "reusing 1 of 2 finished jobs, all made at this commit, b2"
    assert learning.reused(done[3:], "b2") == "every job run afresh"
    assert learning.fingerprint({"name": "a", "commit": "a1"}) == learning.fingerprint({"name": "a", "commit": "b2"})


def test_a_result_stays_valid_when_only_another_tasks_settings_change():
    arm = {"tasks": ["maze", "vsp"], "records": "as_built", "stages": [], "learning_rates": [1e-3], "cost": 1,
           "eval": {"latent": "auto", "max_new_tokens": {"default": 96, "maze": 192}}}
    job = {"name": "a", "task": "vsp", "seed": 0, "lr": 1e-3, "arm": arm, "out": "x", "cost": 2}
    other = {**arm, "cost": 3, "eval": {"latent": "auto", "max_new_tokens": {"default": 96, "maze": 288}}}
    assert learning.fingerprint({**job, "arm": other}) == learning.fingerprint(job)
    drawn = {**arm, "figure": {"task": "vsp", "decoder": ["--aligner-steps", "3000"]}}  # the sketches job's setting
    assert learning.fingerprint({**job, "arm": drawn}) == learning.fingerprint(job)
    this = {**arm, "eval": {"latent": "auto", "max_new_tokens": {"default": 160, "maze": 192}}}
    assert learning.fingerprint({**job, "arm": this}) != learning.fingerprint(job)
    stored = learning.fingerprint(job)  # what result.json keeps compares equal to the job it came from
    assert learning.fingerprint(stored) == learning.fingerprint(job)
