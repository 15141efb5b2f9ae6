"""Benchmarks: MMMU, MMStar and the synthetic tasks as one list of ``Example``s, their prompts, the judgement of one
output, and the scores of a run.

Data comes by hub id through ``datasets.load_dataset`` (``MMMU/MMMU``: one config per subject, all 30; ``Lin-Chen/
MMStar``) or, offline, from a folder of the hub's parquet files (``DIR/Accounting/validation-00000-of-00001.parquet``
as the hub stores MMMU, ``DIR/mmstar.parquet`` for MMStar; any ``*.parquet`` below ``DIR``, those named after the split
when some are). The hub schema is kept: MMMU ``id, question, options`` (a Python list literal), ``answer,
question_type, image_1..image_7`` (``{"bytes", "path"}`` cells); MMStar ``index, question`` (options inline as
``Options: A: ..., B: ...``), ``image, answer, category, l2_category``. The synthetic tasks read a ``data_builders``
folder (``{split}.jsonl``).

Prompts (``--prompt``):

- ``official``: MMMU as the MMMU repository builds it (``configs/llava1.5.yaml`` through ``construct_prompt``):
  ``{question}\\n(A) ...\\n(B) ...\\n\\nAnswer with the option's letter from the given choices directly.``, open
  questions ``{question}\\nAnswer the question using a single word or phrase.``. MMStar, whose authors evaluate with
  VLMEvalKit, as the dataset ships it (options inline) plus the same direct-answer line, as lmms-eval's MMStar task.
- ``vlmevalkit``: VLMEvalKit's prompt for Qwen2-VL / Qwen2.5-VL (``Qwen2VLPromptMixin._build_mmmu_prompt`` /
  ``_build_mcq_prompt``): ``Question: {question}\\nOptions:\\nA. ...\\nB. ...\\nPlease select the correct answer from
  the options above.``; MMStar's question is its stem, with the options listed as VLMEvalKit's A-D columns.

Images go first in the user turn, in column order, and the ``<image k>`` references stay in the text (VLMEvalKit's
Qwen2.5-VL path for MMMU does the same; ``LatentVLM.generate`` renders images before the text). Synthetic prompts are
the record's system and user text, verbatim.
"""

from __future__ import annotations

import ast
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
from PIL import Image

from vlatent import generation
from vlatent.data import RecordError, load_records
from vlatent.scoring import mmmu, mmmu_scores, mmstar, mmstar_scores, parse

PROMPTS = ("official", "vlmevalkit")
SYNTHETIC = ("maze", "vsp", "jigsaw", "depth", "count")
KNOWN_SPLITS = ("train", "dev", "validation", "val", "test")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FALLBACK_SEED = mmmu.DEFAULT_SEED

MMMU_COLUMNS = ("id", "question", "options", "answer", "question_type", "image_1")
MMSTAR_COLUMNS = ("index", "question", "image", "answer", "category", "l2_category")
MMMU_IMAGES = tuple(f"image_{k}" for k in range(1, 8))

DIRECT_MC = "Answer with the option's letter from the given choices directly."
DIRECT_OPEN = "Answer the question using a single word or phrase."
VLMEVALKIT_MC = "Please select the correct answer from the options above."
LATENT_MARKER = re.compile(re.escape(generation.LATENT_MARKER).replace(re.escape("{k}"), r"\d+"))  # "[latent x4]"


class EvalError(Exception):
    """Bad input (benchmark, data, arguments, output folder): ``error: ...`` and exit code 2, no traceback."""


class ImageError(Exception):
    """One example's image cannot be decoded; that example becomes an error row, the others go on."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # "mmmu", "mmstar" or "synthetic": which loader, judge and scorer
    hub_id: str | None  # default --data
    splits: tuple[str, ...]
    default_split: str


BENCHMARKS = {
    "mmmu": Benchmark("mmmu", "mmmu", "MMMU/MMMU", ("dev", "validation", "test"), "validation"),
    "mmstar": Benchmark("mmstar", "mmstar", "Lin-Chen/MMStar", ("val",), "val"),
    **{task: Benchmark(task, "synthetic", None, ("train", "val", "test"), "test") for task in SYNTHETIC},
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


@dataclass
class Example:
    """One question ready to generate. ``images`` are sources (paths or ``{"bytes", "path"}`` cells) decoded batch by
    batch; ``info`` holds the fields a prediction row keeps for grouping (subject / category, l2_category / task,
    question_type); ``error`` says why the example cannot run, so it becomes an error row."""

    id: str
    prompt: str
    images: list
    answer: Any  # option letter, an open answer, or a list of acceptable open answers
    options: list[str] | None
    question_type: str  # "multiple-choice" or "open"
    info: dict
    error: str | None = None

    def open_images(self) -> list[Image.Image]:
        return [open_image(src, f"{self.id}: image {i + 1}") for i, src in enumerate(self.images)]


def open_image(source, where: str) -> Image.Image:
    """Decode a path or an HF image cell to RGB now, so a broken image fails here and not inside generation."""
    try:
        if isinstance(source, dict):
            image = Image.open(io.BytesIO(source["bytes"])) if source.get("bytes") else Image.open(source["path"])
        else:
            image = Image.open(source)
        return image.convert("RGB")
    except Exception as e:  # PIL raises many types for undecodable data
        raise ImageError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_examples(bench: Benchmark, data: str | None, split: str, prompt: str = "official") -> list[Example]:
    """The examples of ``bench`` in dataset order (MMMU: subjects in the official order). Missing files or columns,
    duplicate ids -> ``EvalError``; a bad row (options that do not parse, no answer) -> an example with ``error``."""
    if split not in bench.splits:
        raise EvalError(f"{bench.name} has no split {split!r}; choose from {', '.join(bench.splits)}")
    if prompt not in PROMPTS:
        raise EvalError(f"unknown prompt style {prompt!r}; choose from {', '.join(PROMPTS)}")
    data = data or bench.hub_id
    if data is None:
        raise EvalError(f"{bench.name} needs --data: a folder written by `vlatent build-data {bench.name}`")
    if bench.kind == "mmmu":
        examples = [_mmmu_example(row, group, where, prompt) for group, where, row in
                    _rows(data, split, list(mmmu.SUBJECTS.values()), MMMU_COLUMNS, MMMU_IMAGES)]
        order = {subject: i for i, subject in enumerate(mmmu.SUBJECTS.values())}
        examples.sort(key=lambda ex: order[ex.info["subject"]])  # stable: file order within a subject
    elif bench.kind == "mmstar":
        rows = _rows(data, split, [None], MMSTAR_COLUMNS, ("image",))
        examples = [_mmstar_example(row, prompt) for _, _, row in rows]
    else:
        examples = _synthetic_examples(bench.name, data, split)
    if not examples:
        raise EvalError(f"{data}: no {bench.name} examples in the {split!r} split")
    seen = set()
    for ex in examples:
        if ex.id in seen:
            raise EvalError(f"{data}: id {ex.id!r} occurs twice; predictions are keyed by id")
        seen.add(ex.id)
    return examples


def _rows(data: str, split: str, configs: list, required: tuple, image_columns: tuple) -> Iterator[tuple]:
    """(config or folder name, where, row) for every row of a local parquet folder or a hub dataset."""
    path = Path(data).expanduser()
    if path.is_dir():
        for file in _parquet_files(path, split):
            try:
                table = pq.read_table(file)
            except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is both
                raise EvalError(f"{file}: not a readable parquet file ({e})") from None
            _require(table.column_names, required, str(file))
            for i, row in enumerate(table.to_pylist()):
                yield file.parent.name, f"{file.name} row {i}", row
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(data)) and not path.exists():
        import datasets

        for config in configs:
            try:
                ds = datasets.load_dataset(str(data), config, split=split)
            except Exception as e:  # offline, unknown repo or config: all mean "not loadable from the hub"
                raise EvalError(f"--data {data!r} is not a folder, and loading it from the hub ({config or 'default'} "
                                f"config, split {split!r}) failed: {e}; offline, pass --data DIR holding the hub's "
                                "parquet files") from None
            _require(ds.column_names, required, f"{data} ({config or 'default'})")
            for column in image_columns:  # undecoded cells, as in the parquet files
                if column in ds.column_names:
                    ds = ds.cast_column(column, datasets.Image(decode=False))
            for i, row in enumerate(ds):
                yield config, f"{data} {config or ''} row {i}", row
    else:
        raise EvalError(f"--data {data!r} is neither a folder nor a hub id (org/name)")


def _parquet_files(root: Path, split: str) -> list[Path]:
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise EvalError(f"{root}: no .parquet files in this folder or below")
    named = [f for f in files if f.name == f"{split}.parquet" or f.name.startswith(f"{split}-")]
    if named:
        return named
    found = sorted({f.name.split("-")[0].removesuffix(".parquet") for f in files} & set(KNOWN_SPLITS))
    if found:
        raise EvalError(f"{root}: no {split!r} parquet files (found {', '.join(found)}); choose one with --split")
    return files


def _require(columns, required: tuple, where: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise EvalError(f"{where}: missing column(s) {', '.join(missing)}; expected the hub schema "
                        f"({', '.join(required)}, ...)")


def _vlmevalkit_prompt(question: str, options: list[str] | None) -> str:
    """``Qwen2VLPromptMixin._build_mmmu_prompt`` / ``_build_mcq_prompt`` (no hint in MMMU and MMStar)."""
    prompt = f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in zip(LETTERS, options))
        prompt += VLMEVALKIT_MC
    return prompt.rstrip()


def mmmu_prompt(question: str, options: list[str] | None, style: str) -> str:
    if style == "vlmevalkit":
        return _vlmevalkit_prompt(question, options)
    if options:  # construct_prompt: "({letter}) {option}\n" per option into "{}\n{}\n" + the instruction
        listed = "".join(f"({letter}) {text}\n" for letter, text in zip(LETTERS, options))
        return f"{question}\n{listed}\n{DIRECT_MC}"
    return f"{question}\n{DIRECT_OPEN}"


def mmstar_prompt(question: str, stem: str, options: list[str], style: str) -> str:
    return _vlmevalkit_prompt(stem, options) if style == "vlmevalkit" else f"{question}\n{DIRECT_MC}"


def _mmmu_example(row: dict, group: str, where: str, style: str) -> Example:
    rid, qtype = str(row["id"]), row["question_type"]
    subject = group if group in mmmu.SUBJECT_TO_DISCIPLINE else "_".join(rid.split("_")[1:-1])
    if subject not in mmmu.SUBJECT_TO_DISCIPLINE:
        raise EvalError(f"{where}: id {rid!r}: cannot tell its MMMU subject from its folder or its id")
    info = {"subject": subject, "question_type": qtype}
    images = [row[c] for c in MMMU_IMAGES if row.get(c)]
    answer = _mmmu_gold(row["answer"])

    def bad(reason: str) -> Example:
        return Example(rid, "", [], answer, None, str(qtype), info, error=reason)

    if qtype not in ("multiple-choice", "open"):
        return bad(f"question_type {qtype!r} is neither 'multiple-choice' nor 'open'")
    try:
        options = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else row["options"]
    except (ValueError, SyntaxError):
        return bad(f"options {row['options']!r} is not a Python list literal")
    if not isinstance(options, (list, tuple)):
        return bad(f"options {row['options']!r} is not a list")
    options = [str(o) for o in options] if qtype == "multiple-choice" else None
    if qtype == "multiple-choice" and not options:
        return bad("a multiple-choice question without options")
    return Example(rid, mmmu_prompt(row["question"], options, style), images, answer, options, qtype, info)


def _mmmu_gold(answer) -> str | list[str]:
    """The gold answer; some open answers on the hub are list literals of acceptable answers (``"['7/8', '0.875']"``),
    which the official ``eval_open`` takes as a list."""
    if isinstance(answer, str) and answer.startswith("["):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return answer
        if isinstance(value, list):
            return [str(v) for v in value]
    return str(answer)


_MMSTAR_OPTION = re.compile(r"(?:^|,\s*)([A-Z]):\s*")


def mmstar_options(question: str) -> tuple[str, list[str]] | None:
    """``(stem, options)`` from an MMStar question ``"... Options: A: x, B: y, C: z, D: w"``, or None."""
    stem, sep, tail = question.rpartition("Options:")
    if not sep:
        return None
    parts = _MMSTAR_OPTION.split(tail.strip())  # ["", "A", "x", "B", "y", ...]
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if parts[0].strip() or not letters or letters != list(LETTERS[: len(letters)]):
        return None
    return stem.strip(), texts


def _mmstar_example(row: dict, style: str) -> Example:
    rid = str(row["index"])
    info = {"category": row["category"], "l2_category": row["l2_category"], "question_type": "multiple-choice"}
    parsed = mmstar_options(row["question"])
    if parsed is None:
        return Example(rid, "", [], row["answer"], None, "multiple-choice", info,
                       error="question has no 'Options: A: ..., B: ...' list")
    if not row.get("image"):
        return Example(rid, "", [], row["answer"], None, "multiple-choice", info, error="image is missing")
    stem, options = parsed
    return Example(rid, mmstar_prompt(row["question"], stem, options, style), [row["image"]], str(row["answer"]),
                   options, "multiple-choice", info)


def _synthetic_examples(task: str, data: str, split: str) -> list[Example]:
    root = Path(data).expanduser()
    if not root.is_dir():
        raise EvalError(f"--data {data!r} is not a folder (expected one written by `vlatent build-data {task}`)")
    try:
        records = load_records(root, split=split, check_images=False)
    except (RecordError, FileNotFoundError) as e:
        raise EvalError(str(e)) from None
    tasks = sorted({str(r.get("task")) for r in records})
    records = [r for r in records if r.get("task") == task]
    if not records:
        raise EvalError(f"{root / f'{split}.jsonl'} holds no {task!r} records (tasks: {', '.join(tasks) or 'none'})")
    examples = []
    for rec in records:
        meta = rec.get("meta") or {}
        info = {"task": task, "question_type": meta.get("question_type", task)}
        question = []  # every turn before the first answer: the question as asked
        for msg in rec["messages"]:
            if msg["role"] == "assistant":
                break
            question += msg["content"]
        prompt = "\n".join(c["text"] for c in question if c["type"] == "text")
        images = [rec["images"][c["image"]] for c in question if c["type"] == "image"]
        options = meta.get("options")
        qtype = "multiple-choice" if options else "open"
        error = None if rec.get("answer") not in (None, "") else "record has no answer"
        examples.append(Example(rec["id"], prompt, images, rec.get("answer"), options, qtype, info, error))
    return examples


# ---------------------------------------------------------------------------------------------------------------------
# Judging and scoring


def answer_text(output: str) -> str:
    """The text a judge reads: the output without latent markers (``[latent x4]`` would read as the number 4)."""
    return LATENT_MARKER.sub("", output)


_ANSWER_IS = re.compile(r"answer is\s*:?\s*([^\n]*)", re.IGNORECASE)
# a method's tokens in the text: <observation>, </observation>, <|im_end|>
_MARKUP = re.compile(r"<\|?/?[A-Za-z][\w|]*\|?>")
_EDGES = " \t\n.,;:!?\"'`*()[]{}"


def normalize(text: str) -> str:
    return " ".join(text.lower().split()).strip(_EDGES)


def extract_answer(text: str) -> str | None:
    """A free-form synthetic answer: what follows the last "The answer is", up to the end of its sentence, else the
    last word; normalised (lower case, outer punctuation dropped). None for an empty output. Markup tokens a method
    writes (Monet's ``</observation>`` after "The answer is B.") are not part of the answer."""
    text = _MARKUP.sub(" ", text)
    found = _ANSWER_IS.findall(text)
    if found:
        answer = re.split(r"[.!?](?:\s|$)", found[-1])[0]
    else:
        words = text.split()
        answer = words[-1] if words else ""
    return normalize(answer) or None


def judge(bench: Benchmark, ex: Example, output: str) -> dict:
    """``{"parsed", "fallback", "correct"}`` for one output. ``fallback``: the answer was not found in the output
    (MMMU: its random letter was used, drawn from ``random.Random(f"42:{id}")`` so a rescoring or a resumed run gets the
    same letter; MMStar and synthetic: nothing could be extracted, judged wrong)."""
    text = answer_text(output)
    if bench.kind == "mmmu":
        parsed = parse("mmmu", text, ex.options, ex.question_type, rng=random.Random(f"{FALLBACK_SEED}:{ex.id}"))
        return {"parsed": parsed.answer, "fallback": parsed.fallback, "correct": mmmu.judge(parsed, ex.answer)}
    if ex.options:  # MMStar, and synthetic multiple choice: VLMEvalKit's exact-matching option inference
        parsed = parse("mmstar", text, ex.options)
        return {"parsed": parsed.answer, "fallback": parsed.method == "failed",
                "correct": mmstar.judge(parsed, str(ex.answer))}
    answer = extract_answer(text)
    return {"parsed": answer, "fallback": answer is None, "correct": answer == normalize(str(ex.answer))}


def _group_scores(rows: list[dict]) -> dict:
    correct = sum(bool(r["correct"]) for r in rows)
    return {"acc": correct / len(rows) if rows else 0.0, "num": len(rows), "correct": correct,
            "fallbacks": sum(bool(r["fallback"]) for r in rows)}


def _per(rows: list[dict], key: str) -> dict:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)
    return {name: _group_scores(groups[name]) for name in sorted(groups)}


def score(bench: Benchmark, rows: list[dict]) -> dict:
    """Scores of a run from its prediction rows alone. MMMU: ``mmmu_scores`` (per subject and discipline, the
    official weighting); MMStar: ``mmstar_scores`` (per category and l2 category; ``failed`` = ``fallback``);
    synthetic: accuracy per task and question type. Error rows count as wrong answers (the denominators stay the
    benchmark's); ``errors`` says how many there were."""
    if bench.kind == "mmmu":
        scores = mmmu_scores(rows)
    elif bench.kind == "mmstar":
        scores = mmstar_scores([{**r, "failed": r["fallback"]} for r in rows])
    else:
        overall = _group_scores(rows)
        scores = {"overall": overall.pop("acc"), **overall, "per_task": _per(rows, "task"),
                  "per_question_type": _per(rows, "question_type")}
    return {"benchmark": bench.name, **scores, "errors": sum(1 for r in rows if r.get("error"))}
