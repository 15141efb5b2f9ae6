"""Benchmarks: MMMU, MMStar and the synthetic tasks as one list of ``Example``s, their prompts, the judgement of one
output, and the scores of a run.

Data (``--data``) is a hub id read through ``datasets.load_dataset`` (``MMMU/MMMU``: one config per subject, all 30;
``Lin-Chen/MMStar``), a folder of the hub's parquet files (``DIR/Accounting/validation-00000-of-00001.parquet`` as the
hub stores MMMU, ``DIR/mmstar.parquet`` for MMStar; any ``*.parquet`` below ``DIR``, those named after the split when
some are), or one ``.parquet``, ``.tsv`` or ``.jsonl`` file. A table is in the hub schema (MMMU ``id, question,
options`` (a Python list literal), ``answer, question_type, image_1..image_7``; MMStar ``index, question`` (options
inline as ``Options: A: ..., B: ...``), ``image, answer, category, l2_category``) or in VLMEvalKit's TSV layout
(``index, question, A, B, ..., answer, category, l2-category, split, image``: options in letter columns, images as
base64 text or the text of a list of them, or the index of the row whose image it shares), told apart by its
columns; both give the same examples. An image cell may hold a path (relative to its file), base64 text, bytes, an
HF ``{"bytes", "path"}`` cell or a PIL image. The synthetic tasks read a ``data_builders`` folder
(``{split}.jsonl``). An image path must lie in its file's folder (a hub table's: the ``datasets`` cache), symlinks
resolved, unless ``--allow-outside`` names the folder it leads to.

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
import base64
import binascii
import csv
import io
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow.parquet as pq
from PIL import Image

from vlatent import generation
from vlatent.data import RecordError, load_records
from vlatent.data.records import confined
from vlatent.scoring import mmmu, mmmu_scores, mmstar, mmstar_scores, parse

PROMPTS = ("official", "vlmevalkit")
SYNTHETIC = ("maze", "vsp", "jigsaw", "depth", "count")
KNOWN_SPLITS = ("train", "dev", "validation", "val", "test")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FALLBACK_SEED = mmmu.DEFAULT_SEED

MMMU_COLUMNS = ("id", "question", "options", "answer", "question_type", "image_1")
MMSTAR_COLUMNS = ("index", "question", "image", "answer", "category", "l2_category")
MMMU_TSV_COLUMNS = ("index", "question", "A", "image")  # VLMEvalKit's layout; test files carry no answer
MMSTAR_TSV_COLUMNS = ("index", "question", "A", "answer", "category", "image")
FILE_TYPES = (".parquet", ".tsv", ".jsonl")
VLMEVALKIT_TSV = {  # what to name for an offline user (vlmeval/dataset/image_mcq.py DATASET_URL)
    "mmmu": "MMMU_DEV_VAL.tsv / MMMU_TEST.tsv (https://opencompass.openxlab.space/utils/VLMEval/MMMU_DEV_VAL.tsv)",
    "mmstar": "MMStar.tsv (https://opencompass.openxlab.space/utils/VLMEval/MMStar.tsv)",
}
MMMU_IMAGES = tuple(f"image_{k}" for k in range(1, 8))

DIRECT_MC = "Answer with the option's letter from the given choices directly."
DIRECT_OPEN = "Answer the question using a single word or phrase."
VLMEVALKIT_MC = "Please select the correct answer from the options above."


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
    """Decode one image source to RGB now, so a broken image fails here and not inside generation. A source is a file
    path, base64 text (VLMEvalKit's TSV; a ``data:`` URI too), encoded bytes, an HF ``{"bytes", "path"}`` cell or a
    PIL image."""
    try:
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, str) and Path(source).is_absolute() and _is_file(source):  # made so by _sources
            image = Image.open(source)
        elif isinstance(source, str):
            image = Image.open(io.BytesIO(_base64(source, where)))
        else:
            raise ImageError(f"{where}: an image cell holds {type(source).__name__}, not a path, bytes or base64 text")
        return image.convert("RGB")
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for undecodable data
        raise ImageError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: base64, not a path
        return False


def _base64(text: str, where: str) -> bytes:
    """The bytes of base64 image text; text that is neither a file nor base64 is named in the error."""
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ImageError(f"{where}: {shown!r} is neither an existing image file nor base64 image data") from None


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_examples(bench: Benchmark, data: str | None, split: str, prompt: str = "official",
                  allow_outside: Iterable[str | Path] = ()) -> list[Example]:
    """The examples of ``bench`` in dataset order (MMMU: subjects in the official order). Missing files or columns,
    duplicate ids, image paths outside the data's folder and ``allow_outside`` -> ``EvalError``; a bad row (options
    that do not parse, no answer) -> an example with ``error``."""
    if split not in bench.splits:
        raise EvalError(f"{bench.name} has no split {split!r}; choose from {', '.join(bench.splits)}")
    if prompt not in PROMPTS:
        raise EvalError(f"unknown prompt style {prompt!r}; choose from {', '.join(PROMPTS)}")
    data = data or bench.hub_id
    if data is None:
        raise EvalError(f"{bench.name} needs --data: a folder written by `vlatent build-data {bench.name}`")
    if bench.kind == "mmmu":
        examples = [ex for table in _tables(bench, data, split, list(mmmu.SUBJECTS.values()), allow_outside)
                    for ex in _mmmu_examples(table, split, prompt)]
        order = {subject: i for i, subject in enumerate(mmmu.SUBJECTS.values())}
        examples.sort(key=lambda ex: order[ex.info["subject"]])  # stable: file order within a subject
    elif bench.kind == "mmstar":
        examples = [ex for table in _tables(bench, data, split, [None], allow_outside)
                    for ex in _mmstar_examples(table, prompt)]
    else:
        examples = _synthetic_examples(bench.name, data, split, allow_outside)
    if not examples:
        raise EvalError(f"{data}: no {bench.name} examples in the {split!r} split")
    seen = set()
    for ex in examples:
        if ex.id in seen:
            raise EvalError(f"{data}: id {ex.id!r} occurs twice; predictions are keyed by id")
        seen.add(ex.id)
    return examples


@dataclass
class Table:
    """The rows of one data file or hub config. ``group``: its folder or config name (an MMMU subject, where the hub
    layout names one); ``root``: the folder image paths are read from and must lie in, or in an ``allow_outside``."""

    where: str
    columns: list[str]
    rows: list[dict]
    group: str | None
    root: Path
    allow_outside: tuple = ()

    def vlmevalkit(self) -> bool:
        """VLMEvalKit's TSV layout (options in columns ``A``, ``B``, ...), whatever the file type."""
        return "A" in self.columns and "options" not in self.columns

    def require(self, required: tuple) -> None:
        missing = [c for c in required if c not in self.columns]
        if missing:
            layout = "VLMEvalKit's TSV layout" if self.vlmevalkit() else "the hub schema"
            raise EvalError(f"{self.where}: missing column(s) {', '.join(missing)}; expected {layout} "
                            f"({', '.join(required)}, ...)")


def _tables(bench: Benchmark, data: str, split: str, configs: list, allow_outside: Iterable) -> Iterator[Table]:
    """The tables of ``--data``: one file, a folder of the hub's parquet files, or a hub id."""
    path = Path(data).expanduser()
    if path.is_file():
        tables = [_read_file(path)]
    elif path.is_dir():
        tables = map(_read_file, _parquet_files(path, split))
    elif re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(data)) and path.suffix.lower() not in FILE_TYPES:
        tables = _hub_tables(bench, str(data), split, configs)
    else:
        raise EvalError(f"--data {data!r}: no such file or folder (nor a hub id, org/name)")
    for table in tables:
        table.allow_outside = tuple(allow_outside)
        yield table


def _read_file(file: Path) -> Table:
    """A ``.parquet``, ``.tsv`` (VLMEvalKit: tab separated, a header line) or ``.jsonl`` file as a table."""
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(file)
            columns, rows = table.column_names, table.to_pylist()
        elif suffix == ".tsv":
            csv.field_size_limit(sys.maxsize)  # base64 images are long fields
            with open(file, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t")
                rows, columns = list(reader), list(reader.fieldnames or [])
        elif suffix == ".jsonl":
            rows = []
            for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise EvalError(f"{file} line {n}: not a JSON object ({e})") from None
            columns = list(dict.fromkeys(key for row in rows for key in row))
        else:
            raise EvalError(f"{file}: not a .parquet, .tsv or .jsonl file")
    except (OSError, ValueError, csv.Error, UnicodeDecodeError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise EvalError(f"{file}: not a readable {suffix.lstrip('.')} file ({e})") from None
    return Table(str(file), columns, rows, file.parent.name, file.parent)


def _parquet_files(root: Path, split: str) -> list[Path]:
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise EvalError(f"{root}: no .parquet files in this folder or below (a VLMEvalKit .tsv or a .jsonl file: "
                        "pass the file itself as --data)")
    named = [f for f in files if f.name == f"{split}.parquet" or f.name.startswith(f"{split}-")]
    if named:
        return named
    found = sorted({f.name.split("-")[0].removesuffix(".parquet") for f in files} & set(KNOWN_SPLITS))
    if found:
        raise EvalError(f"{root}: no {split!r} parquet files (found {', '.join(found)}); choose one with --split")
    return files


def _hub_tables(bench: Benchmark, data: str, split: str, configs: list) -> Iterator[Table]:
    import datasets

    for config in configs:
        try:
            ds = datasets.load_dataset(data, config, split=split)
        except Exception as e:  # offline, unknown repo or config: all mean "not loadable from the hub"
            local = f"~/data/{data.split('/')[-1]}"
            tsv = f", or VLMEvalKit's {VLMEVALKIT_TSV[bench.kind]} file" if bench.kind in VLMEVALKIT_TSV else ""
            raise EvalError(f"--data {data!r} is not a file or folder, and loading it from the hub "
                            f"({config or 'default'} config, split {split!r}) failed: {type(e).__name__}: {e}. "
                            f"Offline, download it first: `hf download {data} --repo-type dataset --local-dir "
                            f"{local}` and pass --data {local}{tsv}") from None
        for column in ds.column_names:  # undecoded cells, as in the parquet files
            if isinstance(ds.features[column], datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
        yield Table(f"{data} ({config or 'default'})", ds.column_names, list(ds), config,
                    Path(datasets.config.HF_DATASETS_CACHE))


def _sources(value, table: Table, where: str) -> list:
    """The image sources of the cell ``where`` (``row 3: image_1``): nothing, a path (made absolute; refused outside
    the table's folder), base64 text, bytes, an HF ``{"bytes", "path"}`` cell or a PIL image, or a list of these
    (VLMEvalKit writes several images as the text of a Python list)."""
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")
    if value is None or value == "":
        return []
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # not a list after all: one source, which fails to decode with its text in the error
    if isinstance(value, (list, tuple)):
        return [source for item in value for source in _sources(item, table, where)]
    if isinstance(value, str) and _is_file(str(table.root / value)):  # root / an absolute path is that path
        if not confined(table.root / value, table.root, table.allow_outside):
            raise EvalError(f"{table.where} {where}: {value!r} lies outside the data folder "
                            f"{str(table.root)!r} (pass --allow-outside FOLDER to read images from another folder)")
        return [str(table.root / value)]
    return [value]


def _tsv_images(table: Table) -> list[list]:
    """Each row's images in VLMEvalKit's layout: an ``image`` cell of 64 characters or fewer is the index of the row
    whose image it shares (VLMEvalKit's ``ImageBaseDataset.__init__``)."""
    by_index = {str(row["index"]): row.get("image") for row in table.rows}
    images = []
    for i, row in enumerate(table.rows):
        value = row.get("image")
        if isinstance(value, str) and 0 < len(value) <= 64 and by_index.get(value) not in (None, value):
            value = by_index[value]
        images.append(_sources(value, table, f"row {i}: image"))
    return images


def _tsv_options(row: dict) -> list[str]:
    """The options of a VLMEvalKit row: columns ``A``, ``B``, ... up to the first empty one."""
    options = []
    for letter in LETTERS:
        value = row.get(letter)
        if value is None or value == "" or value != value:  # missing, empty, NaN
            break
        options.append(str(value))
    return options


def _tsv_split(table: Table, split: str) -> list[int]:
    """The rows of ``split`` in a VLMEvalKit table (its ``split`` column; all rows where it has none)."""
    if "split" not in table.columns:
        return list(range(len(table.rows)))
    keep = [i for i, row in enumerate(table.rows) if row.get("split") == split]
    if table.rows and not keep:
        found = sorted({str(row.get("split")) for row in table.rows})
        raise EvalError(f"{table.where}: no {split!r} rows (its split column holds {', '.join(found)}); choose one "
                        "with --split")
    return keep


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


def _mmmu_examples(table: Table, split: str, style: str) -> list[Example]:
    """MMMU examples of one table, in the hub schema or VLMEvalKit's TSV layout (``MMMU_DEV_VAL.tsv``: options in
    ``A``..``I``, empty for open questions; the subject in ``l2-category`` or ``category``, else the ``id``; rows of
    every split, ``split`` says which)."""
    if not table.vlmevalkit():
        table.require(MMMU_COLUMNS)
        return [_mmmu_example(row, [s for c in MMMU_IMAGES for s in _sources(row.get(c), table, f"row {i}: {c}")],
                              table.group, f"{table.where} row {i}", style) for i, row in enumerate(table.rows)]
    table.require(MMMU_TSV_COLUMNS)
    images, examples = _tsv_images(table), []
    for i in _tsv_split(table, split):
        row, options = table.rows[i], _tsv_options(table.rows[i])
        hub = {"id": row.get("id") or str(row["index"]), "question": row["question"], "options": options,
               "answer": row.get("answer") or "",
               "question_type": row.get("question_type") or ("multiple-choice" if options else "open")}
        named = [str(row.get(c) or "").replace(" ", "_") for c in ("l2-category", "category")]
        subject = next((name for name in named if name in mmmu.SUBJECT_TO_DISCIPLINE), None)  # else from the id
        examples.append(_mmmu_example(hub, images[i], subject, f"{table.where} row {i}", style))
    return examples


def _mmmu_example(row: dict, images: list, group: str | None, where: str, style: str) -> Example:
    """One MMMU example from a hub-schema row; the subject is ``group`` (folder, config) or comes from the id."""
    rid, qtype = str(row["id"]), row["question_type"]
    subject = group if group in mmmu.SUBJECT_TO_DISCIPLINE else "_".join(rid.split("_")[1:-1])
    if subject not in mmmu.SUBJECT_TO_DISCIPLINE:
        raise EvalError(f"{where}: id {rid!r}: cannot tell its MMMU subject from its folder, its id or its category")
    info = {"subject": subject, "question_type": qtype}
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


def _mmstar_examples(table: Table, style: str) -> list[Example]:
    """MMStar examples of one table: the hub schema (options inline in the question) or VLMEvalKit's ``MMStar.tsv``
    layout (the question's stem, options in ``A``..``D``), which gives the hub's question back."""
    if not table.vlmevalkit():
        table.require(MMSTAR_COLUMNS)
        return [_mmstar_example(row, row["question"], mmstar_options(row["question"]),
                                _sources(row["image"], table, f"row {i}: image"), row["l2_category"], style)
                for i, row in enumerate(table.rows)]
    table.require(MMSTAR_TSV_COLUMNS)
    examples = []
    for row, images in zip(table.rows, _tsv_images(table)):
        stem, options = str(row["question"]).strip(), _tsv_options(row)
        question = f"{stem}\nOptions: " + ", ".join(f"{letter}: {text}" for letter, text in zip(LETTERS, options))
        l2 = row.get("l2-category", row.get("l2_category", ""))
        examples.append(_mmstar_example(row, question, (stem, options) if options else None, images, l2, style))
    return examples


def _mmstar_example(row: dict, question: str, parsed: tuple | None, images: list, l2: str, style: str) -> Example:
    rid = str(row["index"])
    info = {"category": row["category"], "l2_category": l2, "question_type": "multiple-choice"}
    if parsed is None:
        return Example(rid, "", [], row["answer"], None, "multiple-choice", info,
                       error="question has no 'Options: A: ..., B: ...' list (nor options in columns A, B, ...)")
    if not images:
        return Example(rid, "", [], row["answer"], None, "multiple-choice", info, error="image is missing")
    stem, options = parsed
    return Example(rid, mmstar_prompt(question, stem, options, style), images, str(row["answer"]), options,
                   "multiple-choice", info)


def _synthetic_examples(task: str, data: str, split: str, allow_outside: Iterable) -> list[Example]:
    root = Path(data).expanduser()
    if not root.is_dir():
        raise EvalError(f"--data {data!r} is not a folder (expected one written by `vlatent build-data {task}`)")
    try:
        records = load_records(root, split=split, check_images=False, allow_outside=allow_outside)
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
    return generation.LATENT_MARKER_PATTERN.sub("", output)


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
    official weighting); MMStar: ``mmstar_scores`` (per category and l2 category); synthetic: accuracy per task and
    question type. Answers not found in the output are ``fallbacks`` for every benchmark (``mmstar_scores`` calls them
    ``failed``). Error rows count as wrong answers (the denominators stay the benchmark's); ``errors`` says how many
    there were."""
    if bench.kind == "mmmu":
        scores = mmmu_scores(rows)
    elif bench.kind == "mmstar":
        scores = _renamed(mmstar_scores([{**r, "failed": r["fallback"]} for r in rows]), "failed", "fallbacks")
    else:
        overall = _group_scores(rows)
        scores = {"overall": overall.pop("acc"), **overall, "per_task": _per(rows, "task"),
                  "per_question_type": _per(rows, "question_type")}
    return {"benchmark": bench.name, **scores, "errors": sum(1 for r in rows if r.get("error"))}


def _renamed(value, old: str, new: str):
    if isinstance(value, dict):
        return {(new if key == old else key): _renamed(v, old, new) for key, v in value.items()}
    return value


def mmmu_submission(examples: list[Example], rows: list[dict]) -> dict[str, str]:
    """The file the MMMU evaluation server takes for the test split: one JSON object, id -> answer, the parsed letter
    for a multiple-choice question and the response for an open one (MMMU-Benchmark/MMMU@bb0b95a ``mmmu/README.md``
    lines 12-20, ``mmmu/run_llava.py`` lines 25-29). An example that failed answers as an empty response does (its
    seeded random letter, an empty string)."""
    by_id = {row["id"]: row for row in rows}
    answers = {}
    for ex in examples:
        row = by_id[ex.id]
        if row["error"] is None:
            answers[ex.id] = row["parsed"] if ex.question_type == "multiple-choice" else answer_text(row["output"])
        else:
            answers[ex.id] = judge(BENCHMARKS["mmmu"], ex, "")["parsed"] if ex.options else ""
    return answers
