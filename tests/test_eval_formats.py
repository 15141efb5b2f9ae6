"""`vlatent eval` where users' data already is: one parquet / TSV / JSONL file or a folder, VLMEvalKit's TSV layout
(base64 images, multi-image lists, shared images) loading to the same examples as the hub parquet, images as paths,
bytes or base64 text; one `fallbacks` key in every benchmark's scores; several benchmarks per command; the MMMU test
split's submission file."""

import base64
import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlatent.scoring.mmmu import SUBJECT_TO_DISCIPLINE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_builders import maze  # noqa: E402
from eval.benchmarks import BENCHMARKS, EvalError, load_examples, score  # noqa: E402
from eval.run import evaluate, main  # noqa: E402
from test_eval import (MMMU_SCHEMA, mmmu_rows, mmstar_rows, read_rows, write_mmmu, write_mmstar,  # noqa: E402
                       model, model_dir)  # noqa: F401  (the tiny model fixtures)

MMSTAR_STEM, MMSTAR_OPTIONS = "What colour is the largest shape?", ["red", "green", "blue", "a mix, of colours"]


def b64(cell: dict) -> str:
    return base64.b64encode(cell["bytes"]).decode()


def write_tsv(path: Path, rows: list[dict]) -> Path:
    """A TSV as VLMEvalKit's are read (``pd.read_csv(sep="\\t")``): a header line, tab separated, empty = missing."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def mmmu_tsv_rows(hub: dict) -> list[dict]:
    """MMMU_DEV_VAL.tsv rows for hub rows: options in A..D (empty for open questions), the subject in l2-category and
    its discipline in category, several images as the text of a list of base64 strings; plus a dev-split row."""
    rows = []
    for subject, subject_rows in hub.items():
        for r in subject_rows:
            images = [b64(r[f"image_{k}"]) for k in range(1, 8) if r[f"image_{k}"]]
            options = eval(r["options"])  # the fixture's own literal
            rows.append({"index": len(rows), "question": r["question"],
                         **{letter: text for letter, text in zip("ABCD", options)},
                         "answer": r["answer"], "category": SUBJECT_TO_DISCIPLINE[subject],
                         "l2-category": subject.replace("_", " "), "split": "validation", "id": r["id"],
                         "image": images[0] if len(images) == 1 else str(images),
                         "image_path": str([f"{r['id']}_{k}.png" for k in range(len(images))])})
    rows.append({**rows[0], "index": len(rows), "split": "dev", "id": "dev_Art_1"})
    return rows


def same(examples_a, examples_b):
    fields = [[(ex.id, ex.prompt, ex.answer, ex.options, ex.question_type, ex.info, ex.error) for ex in examples]
              for examples in (examples_a, examples_b)]
    assert fields[0] == fields[1]
    for a, b in zip(examples_a, examples_b):
        pixels = [[np.asarray(image) for image in ex.open_images()] for ex in (a, b)]
        assert len(pixels[0]) == len(pixels[1]) and all(np.array_equal(x, y) for x, y in zip(*pixels))


@pytest.mark.parametrize("prompt", ["official", "vlmevalkit"])
def test_mmmu_vlmevalkit_tsv_loads_as_the_hub_parquet(prompt, tmp_path):
    hub = {"Art_Theory": mmmu_rows("Art_Theory", 4), "Math": mmmu_rows("Math", 4, 4)}
    folder = write_mmmu(tmp_path / "hub", hub)
    tsv = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", mmmu_tsv_rows(hub))
    parquet = load_examples(BENCHMARKS["mmmu"], str(folder), "validation", prompt)
    from_tsv = load_examples(BENCHMARKS["mmmu"], str(tsv), "validation", prompt)
    assert len(parquet) == 8 and sum(len(ex.images) == 2 for ex in parquet) == 4
    assert {ex.question_type for ex in parquet} == {"open", "multiple-choice"}
    same(parquet, from_tsv)
    assert [ex.id for ex in load_examples(BENCHMARKS["mmmu"], str(tsv), "dev")] == ["dev_Art_1"]
    with pytest.raises(EvalError, match=r"MMMU_DEV_VAL.tsv: no 'test' rows \(its split column holds dev, validation"):
        load_examples(BENCHMARKS["mmmu"], str(tsv), "test")


def test_mmstar_vlmevalkit_tsv_loads_as_the_hub_parquet(tmp_path):
    hub = mmstar_rows(6)
    hub[3]["image"] = hub[1]["image"]  # the same picture twice: VLMEvalKit's TSV stores it once
    assert hub[0]["question"] == f"{MMSTAR_STEM}\nOptions: " + ", ".join(
        f"{letter}: {text}" for letter, text in zip("ABCD", MMSTAR_OPTIONS))
    tsv_rows = [{"index": r["index"], "question": MMSTAR_STEM, **dict(zip("ABCD", MMSTAR_OPTIONS)),
                 "answer": r["answer"], "category": r["category"], "l2-category": r["l2_category"],
                 "image": "1" if r["index"] == 3 else b64(r["image"])} for r in hub]
    tsv = write_tsv(tmp_path / "MMStar.tsv", tsv_rows)
    folder = write_mmstar(tmp_path / "hub", hub)
    for prompt in ("official", "vlmevalkit"):
        same(load_examples(BENCHMARKS["mmstar"], str(folder), "val", prompt),
             load_examples(BENCHMARKS["mmstar"], str(tsv), "val", prompt))


def test_data_is_a_file_of_any_kind_with_images_as_paths_bytes_or_base64(tmp_path):
    hub = mmstar_rows(5)
    folder = write_mmstar(tmp_path / "hub", hub)
    reference = load_examples(BENCHMARKS["mmstar"], str(folder), "val")
    same(reference, load_examples(BENCHMARKS["mmstar"], str(folder / "mmstar.parquet"), "val"))  # the file itself

    # JSONL next to its pictures: relative paths, base64 text, a data URI
    (tmp_path / "jsonl" / "images").mkdir(parents=True)
    cells = []
    for r in hub:
        (tmp_path / "jsonl" / "images" / f"{r['index']}.png").write_bytes(r["image"]["bytes"])
        cells.append(f"images/{r['index']}.png")
    cells[1], cells[2] = b64(hub[1]["image"]), "data:image/png;base64," + b64(hub[2]["image"])
    jsonl = tmp_path / "jsonl" / "mmstar.jsonl"
    jsonl.write_text("".join(json.dumps({**r, "image": cell, "meta_info": None}) + "\n" for r, cell in zip(hub, cells)))
    same(reference, load_examples(BENCHMARKS["mmstar"], str(jsonl), "val"))

    # a parquet whose image column holds base64 strings (every row failed with FileNotFoundError before)
    table = pa.Table.from_pylist([{**r, "image": b64(r["image"]), "meta_info": None} for r in hub])
    pq.write_table(table, tmp_path / "b64.parquet")
    same(reference, load_examples(BENCHMARKS["mmstar"], str(tmp_path / "b64.parquet"), "val"))

    # raw bytes in a binary column
    pq.write_table(pa.Table.from_pylist([{**r, "image": r["image"]["bytes"], "meta_info": None} for r in hub]),
                   tmp_path / "bytes.parquet")
    same(reference, load_examples(BENCHMARKS["mmstar"], str(tmp_path / "bytes.parquet"), "val"))


def test_bad_data_is_named(tmp_path):
    hub = mmstar_rows(3)
    rows = [{**r, "image": f"images/{r['index']}.png", "meta_info": None} for r in hub]
    (tmp_path / "missing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_examples(BENCHMARKS["mmstar"], str(tmp_path / "missing.jsonl"), "val")[0]
    with pytest.raises(Exception, match=r"0: image 1: 'images/0.png' is neither an existing image file nor base64"):
        ex.open_images()

    (tmp_path / "cut.jsonl").write_text(json.dumps(rows[0]) + "\n{\"index\": 1, \n")
    with pytest.raises(EvalError, match=r"cut.jsonl line 2: not a JSON object"):
        load_examples(BENCHMARKS["mmstar"], str(tmp_path / "cut.jsonl"), "val")
    with pytest.raises(EvalError, match=r"'bench/MMStar/mmstar.parquet': no such file or folder"):
        load_examples(BENCHMARKS["mmstar"], "bench/MMStar/mmstar.parquet", "val")
    (tmp_path / "MMStar.csv").write_text("index,question\n")
    with pytest.raises(EvalError, match=r"MMStar.csv: not a .parquet, .tsv or .jsonl file"):
        load_examples(BENCHMARKS["mmstar"], str(tmp_path / "MMStar.csv"), "val")
    tsv = write_tsv(tmp_path / "MMStar.tsv", [{"index": 0, "question": "Q?", "A": "x", "image": "abc"}])
    with pytest.raises(EvalError, match=r"MMStar.tsv: missing column\(s\) answer, category; expected VLMEvalKit's"):
        load_examples(BENCHMARKS["mmstar"], str(tsv), "val")


def test_a_hub_id_offline_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError) as e:
        load_examples(BENCHMARKS["mmstar"], None, "val")
    assert "--data 'Lin-Chen/MMStar' is not a file or folder, and loading it from the hub" in str(e.value)
    assert "hf download Lin-Chen/MMStar --repo-type dataset --local-dir ~/data/MMStar" in str(e.value)
    assert "--data ~/data/MMStar, or VLMEvalKit's MMStar.tsv" in str(e.value)


def test_every_benchmark_counts_fallbacks_under_one_key():
    """Three rows, one whose answer was not found and one that failed to run, in each benchmark's row shape."""
    base = {"fallback": False, "correct": False, "error": None}
    mmstar_rows_ = [{**base, "id": "0", "category": "math", "l2_category": "geometry", "correct": True},
                    {**base, "id": "1", "category": "math", "l2_category": "geometry", "fallback": True},
                    {**base, "id": "2", "category": "science", "l2_category": "physics", "error": "no image"}]
    mmmu_rows_ = [{**r, "id": f"validation_Art_{i}", "subject": "Art", "question_type": "open"}
                  for i, r in enumerate(mmstar_rows_)]
    maze_rows = [{**r, "task": "maze", "question_type": "turns"} for r in mmstar_rows_]
    for bench, rows in (("mmstar", mmstar_rows_), ("mmmu", mmmu_rows_), ("maze", maze_rows)):
        scores = score(BENCHMARKS[bench], rows)
        assert "failed" not in json.dumps(scores)
        assert (scores["fallbacks"], scores["errors"], scores["correct"], scores["num"]) == (1, 1, 1, 3)
        groups = [g for key, value in scores.items() if key.startswith("per_") for g in value.values()]
        assert groups and all("fallbacks" in g for g in groups)
    by_category = score(BENCHMARKS["mmstar"], mmstar_rows_)["per_category"]
    assert by_category["math"]["fallbacks"] == 1 and by_category["science"]["fallbacks"] == 0


def test_several_benchmarks_in_one_command(model_dir, tmp_path, capsys):
    mmstar = write_mmstar(tmp_path / "mmstar", mmstar_rows(4))
    data = tmp_path / "maze"
    assert maze.main(["--out", str(data), "--n", "4", "--size", "3", "--split", "0,0,1"]) == 0
    args = ["--model", str(model_dir), "--out", str(tmp_path / "out"), "--max-new-tokens", "4"]
    assert main([*args, "--bench", "mmstar,maze", "--data", str(mmstar), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    summary = (tmp_path / "out" / "summary.md").read_text()
    for bench in ("mmstar", "maze"):
        scores = json.loads((tmp_path / "out" / bench / "scores.json").read_text())
        assert scores["num"] == 4 and len(read_rows(tmp_path / "out" / bench / "predictions.jsonl")) == 4
        split = "val" if bench == "mmstar" else "test"
        line = (f"| {bench} | {split} | {100 * scores['overall']:.2f} | {scores['correct']} | 4 | "
                f"{scores['fallbacks']} | {scores['errors']} | [{bench}/report.md]({bench}/report.md) |")
        assert line in summary and line in printed
    assert not (tmp_path / "out" / "predictions.jsonl").exists()

    # one benchmark's bad data fails the command, not the other benchmark: its results are there
    out = tmp_path / "out2"
    assert main([*args[:2], "--out", str(out), "--max-new-tokens", "4", "--bench", "mmmu,mmstar", "--data",
                 str(tmp_path / "nothing.tsv"), "--data", str(mmstar)]) == 2
    err = capsys.readouterr().err
    assert "error: mmmu: --data" in err and "nothing.tsv': no such file or folder" in err
    assert json.loads((out / "mmstar" / "scores.json").read_text())["num"] == 4
    assert "| mmmu | validation | error: --data" in (out / "summary.md").read_text()
    assert main([*args, "--bench", "mmstar,maze,mmmu", "--data", str(mmstar), "--data", str(data)]) == 2
    assert "--data is given 2 times for 3 benchmarks" in capsys.readouterr().err


def test_mmmu_test_split_writes_the_submission_file(model, tmp_path):
    rows = mmmu_rows("Math", 6)
    for row in rows:
        row["id"], row["answer"] = row["id"].replace("validation", "test"), "?"  # test answers are withheld
    rows[4]["image_1"] = {"bytes": b"not a png", "path": "x.png"}  # a multiple-choice example that fails
    folder = tmp_path / "mmmu" / "Math"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MMMU_SCHEMA), folder / "test-00000-of-00001.parquet")
    out = tmp_path / "out"
    evaluate(model, "mmmu", tmp_path / "mmmu", out, split="test", max_new_tokens=6, latent="on", progress=False)
    submission = json.loads((out / "submission.json").read_text())
    predictions = {r["id"]: r for r in read_rows(out / "predictions.jsonl")}
    assert list(submission) == [f"test_Math_{i}" for i in range(1, 7)]  # every id, in dataset order
    for row in rows:
        answer, prediction = submission[row["id"]], predictions[row["id"]]
        if row["question_type"] == "open":  # the response itself, latent markers removed
            assert answer == re.sub(r"\[latent x\d+\]", "", prediction["output"])
        else:  # strictly a letter of its options (an error row too: the official random fallback)
            assert answer in "ABCD"[:len(eval(row["options"]))] and len(answer) == 1
            assert prediction["error"] is not None or answer == prediction["parsed"]
    assert predictions["test_Math_5"]["error"] is not None
    assert not (tmp_path / "val").exists()
    evaluate(model, "mmmu", write_mmmu(tmp_path / "val", {"Math": rows[:2]}), tmp_path / "val-out", max_new_tokens=2,
             progress=False)
    assert not (tmp_path / "val-out" / "submission.json").exists()  # validation: scores, nothing to submit
