"""The lmms-eval adapter (`eval/lmms.py`, extra `[lmms]`): a tiny local lmms-eval task over the same MMStar parquet
that `vlatent eval` reads gives the same answers and the same score through `--model vlatent`; VLMEvalKit's MMStar.tsv
through lmms-eval's own OpenCompass MMStar functions, as eval/README.md shows it. Skipped without lmms-eval."""

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.lmms import _images, register  # noqa: E402
from eval.run import evaluate  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402
from test_eval import mmstar_rows, read_rows, write_mmstar  # noqa: E402
from test_eval import model, model_dir  # noqa: E402,F401  (the tiny model fixtures)
from test_eval_formats import MMSTAR_OPTIONS, MMSTAR_STEM, b64, write_tsv  # noqa: E402

# A task as a user writes one: vlatent's official MMStar prompt and judge over a local parquet file
TASK = """\
task: tiny_mmstar
dataset_path: parquet
dataset_kwargs:
  data_files:
    val: {data}
test_split: val
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
UTILS = """\
import io

from PIL import Image

from eval.benchmarks import mmstar_options, mmstar_prompt
from vlatent.scoring import judge


def doc_to_visual(doc):
    image = doc["image"]
    return [image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image["bytes"]))]


def doc_to_text(doc):
    stem, options = mmstar_options(doc["question"])
    return mmstar_prompt(doc["question"], stem, options, "official")


def process_results(doc, results):
    _, options = mmstar_options(doc["question"])
    return {"acc": float(judge("mmstar", results[0], doc["answer"], options))}
"""



def readme_tsv_task(data: Path) -> str:
    """eval/README.md's task for VLMEvalKit's MMStar.tsv, pointed at ``data``, answers cut short for speed."""
    readme = (ROOT / "eval" / "README.md").read_text()
    task = re.search(r"```yaml\n(task: mmstar_tsv\n.*?)```", readme, re.S).group(1)
    assert "val: /home/me/LMUData/MMStar.tsv" in task and "max_new_tokens: 256" in task
    return task.replace("/home/me/LMUData/MMStar.tsv", str(data)).replace("max_new_tokens: 256", "max_new_tokens: 6")


def run_lmms(model_dir, tasks: Path, task: str) -> dict:
    register()
    return simple_evaluate(model="vlatent", model_args=f"pretrained={model_dir},latent=on", tasks=[task],
                           batch_size=4, task_manager=TaskManager(include_path=str(tasks)), log_samples=True)


def test_lmms_eval_scores_equal_vlatent_eval(model, model_dir, tmp_path):
    data = write_mmstar(tmp_path / "mmstar", mmstar_rows(6))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mmstar.yaml").write_text(TASK.format(data=data / "mmstar.parquet"))
    (tasks / "utils.py").write_text(UTILS)
    results = run_lmms(model_dir, tasks, "tiny_mmstar")

    scores = evaluate(model, "mmstar", data, tmp_path / "out", batch_size=4, max_new_tokens=6, latent="on",
                      progress=False)
    rows = read_rows(tmp_path / "out" / "predictions.jsonl")
    assert all(row["latent_tokens"] == 4 for row in rows)  # latent reasoning on: K=4 latent steps each
    samples = sorted(results["samples"]["tiny_mmstar"], key=lambda s: s["doc_id"])
    answers = [s["resps"][0][0] for s in samples]
    assert any(answers) and answers == [re.sub(r"\[latent x\d+\]", "", row["output"]) for row in rows]
    assert results["results"]["tiny_mmstar"]["acc,none"] == pytest.approx(scores["overall"])


def test_lmms_eval_reads_vlmevalkit_mmstar_tsv(model_dir, tmp_path):
    rows = mmstar_rows(4)
    tsv = write_tsv(tmp_path / "MMStar.tsv", [
        {"index": r["index"], "question": MMSTAR_STEM, **dict(zip("ABCD", MMSTAR_OPTIONS)), "answer": r["answer"],
         "category": r["category"], "l2_category": r["l2_category"], "image": b64(r["image"])} for r in rows])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mmstar_tsv.yaml").write_text(readme_tsv_task(tsv))
    results = run_lmms(model_dir, tasks, "mmstar_tsv")
    samples = results["samples"]["mmstar_tsv"]
    assert len(samples) == 4
    assert samples[0]["arguments"][0] == textwrap.dedent(f"""\
        {MMSTAR_STEM}
        Options:
        A. red
        B. green
        C. blue
        D. a mix, of colours
        Answer with the option's letter from the given choices directly.""")
    assert 0.0 <= results["results"]["mmstar_tsv"]["average,none"] <= 1.0
    json.dumps(results["results"])  # a plain result, as lmms-eval writes it


def test_a_video_is_refused_not_dropped():
    """A task whose visuals are videos would otherwise be answered from its text alone."""
    with pytest.raises(ValueError, match="task 'clips' document 3: vlatent takes images, not str"):
        _images(["clip.mp4"], "clips", 3)
