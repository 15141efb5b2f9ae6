"""The evaluation runner: MMMU / MMStar parquet folders in the hub schema and a synthetic task through `vlatent eval`
on the tiny model; a run killed half-way resumes without redoing or duplicating an example and scores what the
scorers give from scratch; bad input is a clear error (exit 2) and one bad example never costs the others."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlatent.cli import main as vlatent_main
from vlatent.model import LatentVLM
from vlatent.scoring import mmmu_scores, mmstar_scores
from vlatent.scoring.mmmu import SUBJECTS
from vlatent.testing import build_tiny_model, tiny_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the apps are not installed packages; import them from the checkout, as the CLI does

from data_builders import maze  # noqa: E402
from eval.benchmarks import (BENCHMARKS, EvalError, Example, judge, load_examples, mmmu_prompt,  # noqa: E402
                             mmstar_options, mmstar_prompt)
from eval.run import evaluate, main  # noqa: E402

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MMMU_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                         ("explanation", pa.string()), *((f"image_{k}", IMAGE) for k in range(1, 8)),
                         ("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
                         ("question_type", pa.string()), ("subfield", pa.string())])
MMSTAR_SCHEMA = pa.schema([("index", pa.int64()), ("question", pa.string()), ("image", IMAGE), ("answer", pa.string()),
                           ("category", pa.string()), ("l2_category", pa.string()),
                           ("meta_info", pa.struct([("source", pa.string()), ("split", pa.string()),
                                                    ("image_path", pa.list_(pa.string()))]))])


def png(seed: int) -> dict:
    buf = io.BytesIO()
    tiny_image(seed).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{seed}.png"}


def mmmu_rows(subject: str, n: int, start: int = 0) -> list[dict]:
    """Hub-schema MMMU rows: every third one open, every other one with two images referenced in the text."""
    rows = []
    for i in range(start, start + n):
        two = i % 2 == 0
        images = {f"image_{k}": None for k in range(1, 8)} | {"image_1": png(i)}
        if two:
            images["image_2"] = png(100 + i)
        question = "Which shape in <image 1> is larger" + (" than in <image 2>?" if two else "?")
        is_open = i % 3 == 0
        rows.append({"id": f"validation_{subject}_{i + 1}", "question": question,
                     "options": "[]" if is_open else "['the circle', 'the square', '<image 2>', 'the star']",
                     "explanation": "", **images, "img_type": "['Diagrams']", "answer": "3" if is_open else "BC"[i % 2],
                     "topic_difficulty": "Easy", "question_type": "open" if is_open else "multiple-choice",
                     "subfield": "Geometry"})
    return rows


def write_mmmu(root: Path, rows_by_subject: dict) -> Path:
    for subject, rows in rows_by_subject.items():
        (root / subject).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=MMMU_SCHEMA),
                       root / subject / "validation-00000-of-00001.parquet")
    return root


def mmstar_rows(n: int) -> list[dict]:
    categories = [("coarse perception", "image scene and topic"), ("math", "numeric commonsense and calculation")]
    return [{"index": i, "question": f"What colour is the largest shape?\nOptions: A: red, B: green, C: blue, D: a "
                                    f"mix, of colours", "image": png(i), "answer": "ABCD"[i % 4],
             "category": categories[i % 2][0], "l2_category": categories[i % 2][1],
             "meta_info": {"source": "MMBench", "split": "val", "image_path": [f"images/{i}.jpg"]}} for i in range(n)]


def write_mmstar(root: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MMSTAR_SCHEMA), root / "mmstar.parquet")
    return root


def renamed(src: Path, dst: Path, split: str) -> Path:
    """A copy of a parquet folder with the split in the file names changed."""
    for f in src.rglob("*.parquet"):
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        (dst / f.parent.name / f.name.replace("validation", split)).write_bytes(f.read_bytes())
    return dst


def mmstar_fresh(rows: list[dict]) -> dict:
    """``mmstar_scores`` from scratch, its ``failed`` counts under the one key every benchmark's scores use."""
    return json.loads(json.dumps(mmstar_scores([{**r, "failed": r["fallback"]} for r in rows])).replace(
        '"failed":', '"fallbacks":'))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("eval-model"), method="mirage")


@pytest.fixture(scope="module")
def model(model_dir):
    return LatentVLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def mmmu_dir(tmp_path_factory):
    return write_mmmu(tmp_path_factory.mktemp("mmmu"), {"Art": mmmu_rows("Art", 6), "Math": mmmu_rows("Math", 6, 6)})


@pytest.fixture(scope="module")
def mmstar_dir(tmp_path_factory):
    return write_mmstar(tmp_path_factory.mktemp("mmstar"), mmstar_rows(12))


def run_cli(args: list, log: Path) -> subprocess.Popen:
    """`vlatent eval ARGS` in a child process, its output into ``log`` (a pipe nobody reads could fill and stall it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "vlatent.cli", "eval", *map(str, args)], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("bench", ["mmmu", "mmstar"])
def test_killed_run_resumes_without_duplicates_and_scores_from_scratch(bench, model_dir, mmmu_dir, mmstar_dir,
                                                                       tmp_path, capsys):
    data = mmmu_dir if bench == "mmmu" else mmstar_dir
    out = tmp_path / "out"
    args = ["--model", model_dir, "--bench", bench, "--data", data, "--out", out, "--batch-size", 1,
            "--max-new-tokens", 48, "--latent", "on"]
    proc = run_cli(args, tmp_path / "log.txt")
    predictions = out / "predictions.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if predictions.is_file() and predictions.read_bytes().count(b"\n") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{log}"
    before = predictions.read_text().splitlines(keepends=True)
    kept = [line for line in before if line.endswith("\n")]
    assert 2 <= len(kept) < 12

    assert vlatent_main(["eval", *map(str, args)]) == 0  # the same command again, in this process
    lines = predictions.read_text().splitlines(keepends=True)
    assert lines[:len(kept)] == kept  # the rows made before the kill were kept, not redone
    rows = [json.loads(line) for line in lines]
    ids = [row["id"] for row in rows]
    expected = [ex.id for ex in load_examples(BENCHMARKS[bench], str(data), BENCHMARKS[bench].default_split)]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)) == 12

    scores = json.loads((out / "scores.json").read_text())
    fresh = mmmu_scores(rows) if bench == "mmmu" else mmstar_fresh(rows)
    assert {k: scores[k] for k in fresh} == json.loads(json.dumps(fresh))
    assert scores["num"] == 12 and scores["errors"] == 0
    assert all(row["latent_tokens"] == 4 and row["seconds"] > 0 for row in rows)  # --latent on: K=4 latents each
    report = (out / "report.md").read_text()
    assert "## Overall" in report and ("Per subject" if bench == "mmmu" else "Per l2 category") in report
    assert (out / "scores.png").read_bytes().startswith(b"\x89PNG")
    assert f"{bench}: " in capsys.readouterr().out


def test_synthetic_maze_through_evaluate(model, tmp_path):
    data, out = tmp_path / "maze", tmp_path / "out"
    assert maze.main(["--out", str(data), "--n", "12", "--size", "3-4", "--split", "0,0,1"]) == 0
    scores = evaluate(model, "maze", data, out, batch_size=4, max_new_tokens=12, progress=False)
    rows = read_rows(out / "predictions.jsonl")
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert [r["answer"] for r in rows] == [r["answer"] for r in records]
    assert scores["num"] == 12 and scores["per_task"]["maze"]["num"] == 12
    assert set(scores["per_question_type"]) == {"first_move", "turns", "reachable", "route_mc"}
    assert scores == json.loads((out / "scores.json").read_text())

    assert json.loads((out / "run.json").read_text())["latent"] == "auto"  # the default, recorded
    off = evaluate(model, "maze", data, tmp_path / "off", latent="off", limit=4, max_new_tokens=4, progress=False)
    assert off["num"] == 4 and json.loads((tmp_path / "off" / "run.json").read_text())["latent"] == "off"


@pytest.fixture(scope="module")
def opener(model_dir):
    """The tiny model with the latent start token's logit raised by a bias on the LM head: a model that opens a latent
    segment on its own (a random one never would)."""
    model = LatentVLM.from_pretrained(model_dir).eval()
    bias = torch.zeros(model.backbone.model.get_output_embeddings().weight.shape[0])
    bias[model.method.config.latent_start_id] = 100.0
    model.backbone.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    return model


def test_latent_modes_auto_by_default_on_forces_off_forbids(model, opener, tmp_path):
    data = tmp_path / "maze"
    assert maze.main(["--out", str(data), "--n", "4", "--size", "3", "--split", "0,0,1"]) == 0
    examples = load_examples(BENCHMARKS["maze"], str(data), "test")

    def rows(m, name, **kw):
        evaluate(m, "maze", data, tmp_path / name, batch_size=4, max_new_tokens=8, progress=False, **kw)
        assert json.loads((tmp_path / name / "run.json").read_text())["latent"] == kw.get("latent", "auto")
        return read_rows(tmp_path / name / "predictions.jsonl")

    # default: auto, no prefix: each answer is what the model generates unprompted (here, text from the first token)
    free = model.generate([ex.open_images() for ex in examples], [ex.prompt for ex in examples], max_new_tokens=8)
    default = rows(model, "default")
    assert [r["output"] for r in default] == [g.text for g in free] and not any(r["latent_tokens"] for r in default)
    # on: every answer starts with a K-step latent segment
    assert all(r["output"].startswith("[latent x4]") and r["latent_tokens"] == 4 for r in rows(model, "on", latent="on"))
    # a model that opens segments by itself: auto lets it (its first choice is the latent start), off never does
    assert all(r["output"].startswith("[latent x4]") for r in rows(opener, "auto", latent="auto"))
    off = rows(opener, "off", latent="off")
    assert all(r["latent_tokens"] == 0 and "[latent" not in r["output"] and r["error"] is None for r in off)

    with pytest.raises(EvalError, match="latent must be one of auto, on, off"):
        evaluate(model, "maze", data, tmp_path / "bad", latent="maybe", progress=False)
    text = LatentVLM.from_pretrained(build_tiny_model(tmp_path / "text", method="text")).eval()
    with pytest.raises(EvalError, match="needs a method with latent tokens"):
        evaluate(text, "maze", data, tmp_path / "text-on", latent="on", progress=False)
    outputs = [[r["output"] for r in rows(text, f"text-{mode}", latent=mode)] for mode in ("auto", "off")]
    assert outputs[0] == outputs[1]  # no latent tokens, nothing to suppress: off generates as auto does


@pytest.mark.parametrize("output, correct", [
    ("[latent x4]Let me look. The answer is up.", True),
    ("I would go UP", True),
    ("The answer is: up!\nThe answer is down.", False),  # the last statement counts
    ("up or down, the answer is down", False),
    ("", False),
])
def test_synthetic_free_form_answers(output, correct):
    ex = Example("maze-1", "Which way first?", [], "up", None, "open", {"task": "maze", "question_type": "first_move"})
    verdict = judge(BENCHMARKS["maze"], ex, output)
    assert verdict["correct"] is correct and verdict["fallback"] is (output == "")


def test_synthetic_multiple_choice_uses_option_inference():
    ex = Example("maze-2", "?", [], "B", ["up 1, left 2", "down 3", "left 1", "right 2"], "multiple-choice", {})
    assert judge(BENCHMARKS["maze"], ex, "The answer is B.")["correct"]
    assert judge(BENCHMARKS["maze"], ex, "the route is down 3")["correct"]  # option text, no letter
    assert judge(BENCHMARKS["maze"], ex, "[latent x4]")["fallback"]  # a marker is no answer


def test_ranks_shard_and_rank0_merges(model, mmstar_dir, tmp_path):
    out = tmp_path / "out"
    kw = dict(batch_size=4, max_new_tokens=4, world_size=2, progress=False)
    assert evaluate(model, "mmstar", mmstar_dir, out, rank=1, **kw) == {}
    assert len(read_rows(out / "predictions.rank1.jsonl")) == 6 and not (out / "predictions.jsonl").exists()
    scores = evaluate(model, "mmstar", mmstar_dir, out, rank=0, **kw)
    rows = read_rows(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == [str(i) for i in range(12)] and scores["num"] == 12
    assert not list(out.glob("predictions.rank*"))


def test_mmstar_multimodal_gain_and_leakage_from_no_image_runs(model, mmstar_dir, tmp_path):
    kw = dict(batch_size=6, max_new_tokens=4, progress=False, latent="off")
    wv = evaluate(model, "mmstar", mmstar_dir, tmp_path / "wv", images="off", **kw)
    rows = read_rows(tmp_path / "wv" / "predictions.jsonl")
    assert len(rows) == 12 and json.loads((tmp_path / "wv" / "run.json").read_text())["images"] == "off"
    # the LLM base's text-only run: here the same tiny model, which is all S_t needs to be
    t = evaluate(model, "mmstar", mmstar_dir, tmp_path / "t", images="off", **kw)
    scores = evaluate(model, "mmstar", mmstar_dir, tmp_path / "v", gain_against=tmp_path / "wv",
                      leakage_against=tmp_path / "t", **kw)
    g = scores["multimodal_gain"]
    assert g["s_v"] == scores["overall"] and g["s_wv"] == wv["overall"] and g["s_t"] == t["overall"]
    assert g["mg"] == pytest.approx(scores["overall"] - wv["overall"]) and g["ml"] == max(0.0, wv["overall"] - t["overall"])
    assert "## Multi-modal gain and leakage" in (tmp_path / "v" / "report.md").read_text()
    with pytest.raises(EvalError, match="must be a mmstar val run with --images off"):
        evaluate(model, "mmstar", mmstar_dir, tmp_path / "v2", gain_against=tmp_path / "v", **kw)
    with pytest.raises(EvalError, match="not a finished eval folder"):
        evaluate(model, "mmstar", mmstar_dir, tmp_path / "v3", gain_against=tmp_path / "nothing", **kw)


def test_prompts_follow_the_official_templates():
    options = ["cat", "dog"]
    assert mmmu_prompt("Q <image 1>?", options, "official") == (
        "Q <image 1>?\n(A) cat\n(B) dog\n\nAnswer with the option's letter from the given choices directly.")
    assert mmmu_prompt("Q?", None, "official") == "Q?\nAnswer the question using a single word or phrase."
    assert mmmu_prompt("Q?", options, "vlmevalkit") == (
        "Question: Q?\nOptions:\nA. cat\nB. dog\nPlease select the correct answer from the options above.")
    assert mmmu_prompt("Q?", None, "vlmevalkit") == "Question: Q?"
    question = "Q?\nOptions: A: cat, B: dog"
    assert mmstar_prompt(question, "Q?", options, "official") == (
        f"{question}\nAnswer with the option's letter from the given choices directly.")
    assert mmstar_prompt(question, "Q?", options, "vlmevalkit") == mmmu_prompt("Q?", options, "vlmevalkit")


def test_mmstar_options_parse():
    assert mmstar_options("Which one?\nOptions: A: 1, 2 and 3, B: yes, C: no, D: C: maybe") == (
        "Which one?", ["1, 2 and 3", "yes", "no", "C: maybe"])
    assert mmstar_options("Which one? A or B") is None


def test_one_bad_example_never_costs_the_others(model_dir, tmp_path, capsys):
    rows = mmstar_rows(8)
    rows[2]["image"] = {"bytes": b"not a png", "path": "2.png"}  # does not decode
    buf = io.BytesIO()
    tiny_image(0, size=(600, 2)).save(buf, format="PNG")
    rows[5]["image"] = {"bytes": buf.getvalue(), "path": "5.png"}  # decodes, but the processor refuses it
    rows[6]["question"] = "What colour is it?"  # no options
    data, out = write_mmstar(tmp_path / "mmstar", rows), tmp_path / "out"
    args = ["--model", str(model_dir), "--bench", "mmstar", "--data", str(data), "--batch-size", "4",
            "--max-new-tokens", "4"]
    assert main([*args, "--out", str(out)]) == 2  # scored, but more rows failed than --max-failures (0)
    assert "mmstar: 3 examples failed (more than --max-failures 0)" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "tolerant"), "--max-failures", "3"]) == 0
    got = {r["id"]: r for r in read_rows(out / "predictions.jsonl")}
    assert len(got) == 8
    assert "cannot decode the image" in got["2"]["error"] and "aspect ratio" in got["5"]["error"]
    assert "no 'Options:" in got["6"]["error"]
    assert all(got[i]["error"] is None and got[i]["output"] is not None for i in "01347")
    scores = json.loads((out / "scores.json").read_text())
    assert scores["errors"] == 3 and scores["num"] == 8
    assert json.loads((out / "run.json").read_text())["latent"] == "auto"  # the command line's default
    assert "## Errors (3)" in (out / "report.md").read_text()


def test_a_systemic_fault_is_an_error_and_its_rows_are_retried(model, model_dir, tmp_path, capsys):
    """Every image in a format nothing decodes: no 0% result, and once the data is fixed the failed rows are redone
    while the predictions made before are kept."""
    good, broken = mmstar_rows(6), mmstar_rows(6)
    for row in broken:
        row["image"] = {"bytes": b"GIF89a but not really", "path": "x.gif"}
    data, out = tmp_path / "mmstar", tmp_path / "out"
    kw = dict(batch_size=2, max_new_tokens=4, progress=False)

    write_mmstar(data, broken)
    assert main(["--model", str(model_dir), "--bench", "mmstar", "--data", str(data), "--out", str(out),
                 "--batch-size", "2", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "error: all 6 examples this run tried failed, so nothing was scored; the first, example '0': 0: image 1: " \
           "cannot decode the image" in err
    assert not (out / "scores.json").exists() and len(read_rows(out / "predictions.jsonl")) == 6

    write_mmstar(data, good[:3] + broken[3:])  # half fixed: the failed rows are retried, not counted as done
    half = evaluate(model, "mmstar", data, out, **kw)
    first = read_rows(out / "predictions.jsonl")
    assert [r["error"] is None for r in first] == [True] * 3 + [False] * 3 and half["errors"] == 3
    # a rerun still half broken: every row it tries fails, so it is an error and the scores above stand
    with pytest.raises(EvalError, match="all 3 examples this run tried failed.*example '3': 3: image 1: cannot decode"):
        evaluate(model, "mmstar", data, out, **kw)
    assert json.loads((out / "scores.json").read_text()) == json.loads(json.dumps(half))

    write_mmstar(data, good)
    scores = evaluate(model, "mmstar", data, out, **kw)
    rows = read_rows(out / "predictions.jsonl")
    assert rows[:3] == first[:3]  # kept as they were (same timings): not redone
    assert [r["id"] for r in rows] == [str(i) for i in range(6)] and all(r["error"] is None for r in rows)
    fresh = mmstar_fresh(rows)
    assert {k: scores[k] for k in fresh} == json.loads(json.dumps(fresh)) and scores["num"] == 6


def bad_run(capsys, model_dir, tmp_path, *args) -> str:
    assert main(["--model", str(model_dir), "--out", str(tmp_path / "out"), *map(str, args)]) == 2
    return capsys.readouterr().err


def test_bad_input_is_a_clear_error(model_dir, mmmu_dir, tmp_path, capsys):
    assert "invalid choice: 'mmlu'" in bad_run(capsys, model_dir, tmp_path, "--bench", "mmlu")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: no .parquet files" in bad_run(capsys, model_dir, tmp_path, "--bench", "mmmu", "--data", empty)
    assert "no 'validation' parquet files (found dev)" in bad_run(
        capsys, model_dir, tmp_path, "--bench", "mmmu", "--data", renamed(mmmu_dir, tmp_path / "dev", "dev"))
    broken = tmp_path / "broken" / "Art"
    broken.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(mmmu_rows("Art", 2)).drop(["question_type"]), broken / "validation.parquet")
    err = bad_run(capsys, model_dir, tmp_path, "--bench", "mmmu", "--data", broken.parent)
    assert "validation.parquet: missing column(s) question_type" in err
    err = bad_run(capsys, model_dir, tmp_path, "--bench", "maze", "--data", empty)
    assert "no dataset file" in err and "test.jsonl" in err
    assert "needs --data" in bad_run(capsys, model_dir, tmp_path, "--bench", "count")
    assert "--data 'no/such/dir'" in bad_run(capsys, model_dir, tmp_path, "--bench", "mmstar", "--data", "no/such/dir")
    assert "no split 'train'" in bad_run(capsys, model_dir, tmp_path, "--bench", "mmmu", "--data", mmmu_dir,
                                         "--split", "train")
    assert "not a model directory" in bad_run(capsys, tmp_path / "nothing", tmp_path, "--bench", "mmmu", "--data",
                                              mmmu_dir)


def test_rerun_with_other_settings_is_refused(model, mmstar_dir, tmp_path):
    evaluate(model, "mmstar", mmstar_dir, tmp_path, limit=2, max_new_tokens=2, progress=False)
    with pytest.raises(EvalError, match="prompt: 'official' there, 'vlmevalkit' now"):
        evaluate(model, "mmstar", mmstar_dir, tmp_path, limit=2, max_new_tokens=2, prompt="vlmevalkit", progress=False)


def test_hub_ids_load_every_config_through_datasets(mmmu_dir, mmstar_dir, monkeypatch):
    """By hub id the loaders ask `datasets.load_dataset` for each MMMU subject config (the MMStar default config) and
    read its rows as the parquet files' (images undecoded); faked here with the local files, offline."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        folder = (mmmu_dir / name) if path == "MMMU/MMMU" else mmstar_dir
        if not folder.is_dir():
            return datasets.Dataset.from_parquet(str(mmmu_dir / "Art" / "validation-00000-of-00001.parquet")).select([])
        ds = datasets.Dataset.from_parquet([str(f) for f in folder.glob("*.parquet")])
        columns = [c for c in ds.column_names if c == "image" or c.startswith("image_")]
        return ds.cast(datasets.Features({**ds.features, **{c: datasets.Image() for c in columns}}))  # as on the hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples(BENCHMARKS["mmmu"], None, "validation")
    assert [c[1] for c in calls] == list(SUBJECTS.values())  # all 30, in the official order
    assert [ex.id for ex in examples] == [f"validation_Art_{i}" for i in range(1, 7)] + [
        f"validation_Math_{i}" for i in range(7, 13)]
    assert {ex.info["subject"] for ex in examples} == {"Art", "Math"} and len(examples[0].open_images()) == 2
    calls.clear()
    examples = load_examples(BENCHMARKS["mmstar"], None, "val", "vlmevalkit")
    assert calls == [("Lin-Chen/MMStar", None, "val")] and len(examples) == 12
    assert examples[0].open_images()[0].size == (56, 56) and examples[0].prompt.startswith("Question: What colour")


def test_a_line_cut_by_a_kill_is_redone(model, mmstar_dir, tmp_path):
    evaluate(model, "mmstar", mmstar_dir, tmp_path, limit=3, max_new_tokens=2, progress=False)
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write('{"id": "3", "output": "The ans')  # the kill came in the middle of a write
    evaluate(model, "mmstar", mmstar_dir, tmp_path, limit=5, max_new_tokens=2, progress=False)
    assert [r["id"] for r in read_rows(tmp_path / "predictions.jsonl")] == ["0", "1", "2", "3", "4"]
