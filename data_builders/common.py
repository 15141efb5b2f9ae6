"""What every builder shares: argument types, the dataset writer (splits, temp files, dataset_info.json, progress
bar), the record layout, balanced and de-duplicated sampling for the synthetic tasks, and the converter loop.

A built dataset is a folder with ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (records of ``shared/DESIGN.md``),
``images/`` and ``dataset_info.json``. A build writes into a temporary folder beside it and moves the dataset into
place only when the whole build succeeded, ``dataset_info.json`` last, so a folder holding it holds a complete dataset
and a failed build leaves the folder as it was. An existing dataset is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

SPLITS = ("train", "val", "test")
LETTERS = "ABCDEFGH"
MAX_TRIES = 2000  # draws per example before a synthetic builder gives up on finding a new one
SHOWN_BAD = 10  # skipped converter records reported one by one; the rest are only counted
SYNTHETIC_SPLIT = (0.8, 0.1, 0.1)  # the synthetic builders' default --split
OUTPUTS = ("dataset_info.json", *(f"{s}.jsonl" for s in SPLITS), "images")  # what a build puts in its folder


def cell_name(r: int, c: int) -> str:
    """A grid cell as reasoning traces and captions name it, from 0-based (row, column)."""
    return f"row {r + 1}, column {c + 1}"


class BuildError(Exception):
    """A problem with the input or the request; reported as ``error: ...`` with exit code 2, without a traceback."""


class BadRecord(Exception):
    """A source record a converter cannot map; the converter stops on it unless ``--skip-bad``."""


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def run(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], None], argv: list[str] | None) -> int:
    """Parse ``argv`` and build; every builder's ``main`` is this, so each returns an exit code and never a traceback
    for bad input (argparse's own errors exit with 2 and a usage line)."""
    try:
        build(parser.parse_args(argv))
    except SystemExit as e:  # argparse: --help (0) or a bad argument (2), already printed
        return e.code if isinstance(e.code, int) else 2
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_range(lo: int, hi: int) -> Callable[[str], tuple[int, int]]:
    """Argument type for ``5`` or ``3-6`` within ``[lo, hi]``, returned as an inclusive (min, max) pair."""

    def parse(text: str) -> tuple[int, int]:
        parts = text.split("-")
        try:
            a, b = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
        except ValueError:
            a = b = None
        if a is None or not lo <= a <= b <= hi:
            raise argparse.ArgumentTypeError(f"expected N or MIN-MAX between {lo} and {hi}, got {text!r}")
        return a, b

    return parse


def choices_list(allowed: Iterable[str]) -> Callable[[str], list[str]]:
    """Argument type for a comma-separated subset of ``allowed`` (order kept, duplicates dropped)."""
    allowed = list(allowed)

    def parse(text: str) -> list[str]:
        picked = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        unknown = [t for t in picked if t not in allowed]
        if unknown or not picked:
            raise argparse.ArgumentTypeError(f"unknown option {', '.join(unknown) or text!r}; "
                                             f"choose from {','.join(allowed)}")
        return picked

    return parse


def split_fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(t) for t in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or not 0.999 < sum(parts) < 1.001:
        raise argparse.ArgumentTypeError(f"expected three fractions TRAIN,VAL,TEST summing to 1, got {text!r}")
    return parts


def _no_file_in_the_way(text: str) -> Path:
    """An output path whose missing parent folders can be created (they are, when it is written)."""
    path = Path(text)
    if blocking := next((p for p in path.resolve().parents if p.exists() and not p.is_dir()), None):
        raise argparse.ArgumentTypeError(f"{text!r}: {str(blocking)!r} is a file, not a folder")
    return path


def output_dir(text: str) -> Path:
    path = _no_file_in_the_way(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return path


def output_file(text: str) -> Path:
    return _no_file_in_the_way(text)


def existing_file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return Path(text)


def existing_dir(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return Path(text)


def tool_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """A parser named ``vlatent build-data NAME``; ``doc`` is the module docstring (first line = description)."""
    return argparse.ArgumentParser(prog=f"vlatent build-data {name}", description=doc.strip().split("\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def builder_parser(name: str, doc: str, *, split: str) -> argparse.ArgumentParser:
    """A parser with the options every builder has."""
    p = tool_parser(name, doc)
    p.add_argument("--out", type=output_dir, required=True, default=argparse.SUPPRESS,
                   help="output folder (missing parents are created)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--split", type=split_fractions, default=split, metavar="TRAIN,VAL,TEST",
                   help="fractions of the examples per split")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    return p


def synthetic_parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = builder_parser(name, doc, split=",".join(map(str, SYNTHETIC_SPLIT)))
    p.add_argument("--n", type=positive_int, default=1000, help="number of examples over all splits")
    return p


def converter_parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = builder_parser(name, doc, split="0.9,0.05,0.05")
    p.add_argument("--source", type=existing_file, required=True, help="source file: .json, .jsonl or .parquet")
    p.add_argument("--images", type=existing_dir, default=None,
                   help="folder relative image paths start from (default: the source file's folder)")
    p.add_argument("--skip-bad", action="store_true", help="skip records that cannot be mapped instead of stopping")
    p.add_argument("--allow-outside", type=existing_dir, action="append", default=[], metavar="PATH",
                   help="also copy images from this folder (repeatable); by default a record's images must lie in "
                        "the image root (--images, or the source file's folder)")
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def existing_outputs(out: Path) -> list[str]:
    """The build outputs (``OUTPUTS``) already in ``out``: a dataset, or what is left of one, that a build replaces."""
    return [name for name in OUTPUTS if os.path.lexists(Path(out) / name)]


class DatasetWriter:
    """Streams records into the splits of a new dataset in a temporary folder beside ``out`` and, when the build
    finishes, moves it into ``out`` (``dataset_info.json`` last). A build that fails or is interrupted removes the
    temporary folder and leaves ``out`` as it was; one killed outright leaves only a hidden ``.NAME.*.building``
    beside it. An existing dataset in ``out`` is replaced only with ``--overwrite``."""

    def __init__(self, out: Path, builder: str, version: int, args: argparse.Namespace, extra_info: dict | None = None):
        self.out = Path(out)
        found = existing_outputs(self.out)
        if found and not args.overwrite:
            raise BuildError(f"{self.out} already holds a dataset ({', '.join(found)}); pass --overwrite to replace it")
        self.info = {"builder": builder, "version": version, "seed": args.seed,
                     "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())},
                     **(extra_info or {})}
        self.counts = Counter()
        self.answers = {s: Counter() for s in SPLITS}
        self.tasks = {s: Counter() for s in SPLITS}
        self.files = {}

    def __enter__(self) -> "DatasetWriter":
        real = self.out.resolve()  # beside the real folder, so the final moves are renames on one file system
        real.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.", suffix=".building", dir=real.parent))
        self.new, self.images = self.tmp / "new", self.tmp / "new" / "images"
        self.images.mkdir(parents=True)  # not mkdtemp's private mode: the dataset gets the usual permissions
        self.files = {s: open(self.new / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        return self

    def image_path(self, name: str, ext: str = ".png") -> tuple[str, Path]:
        """(path as stored in the record, path on disk) for an image called ``name``."""
        return f"images/{name}{ext}", self.images / f"{name}{ext}"

    def save(self, image: Image.Image, name: str) -> str:
        """Save a drawn image (fast PNG: these are flat drawings) and return its record path."""
        rel, path = self.image_path(name)
        image.save(path, compress_level=1)
        return rel

    def write(self, split: str, record: dict) -> None:
        self.files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
        self.counts[split] += 1
        self.answers[split][str(record.get("answer"))] += 1
        self.tasks[split][record.get("task")] += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        for f in self.files.values():
            f.close()
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self.info["counts"] = {s: self.counts[s] for s in SPLITS}
        self.info["tasks"] = {s: dict(sorted(self.tasks[s].items())) for s in SPLITS}
        # Converters meet free-form answers: keep the 100 most common and say how many distinct there are.
        self.info["answers"] = {s: dict(sorted(self.answers[s].most_common(100))) for s in SPLITS}
        self.info["distinct_answers"] = {s: len(self.answers[s]) for s in SPLITS}
        info = json.dumps(self.info, indent=2, ensure_ascii=False, default=str)  # default: --allow-outside's paths
        (self.new / "dataset_info.json").write_text(info + "\n", encoding="utf-8")
        self.out.mkdir(exist_ok=True)
        old = self.tmp / "old"
        old.mkdir()
        for name in existing_outputs(self.out):  # the old dataset out, its dataset_info.json first
            os.replace(self.out / name, old / name)
        for name in reversed(OUTPUTS):  # the new one in, its dataset_info.json last
            os.replace(self.new / name, self.out / name)
        shutil.rmtree(self.tmp)  # only now: if a move failed, both datasets are still in the temporary folder


def content(items: list, kind: str) -> list[dict]:
    """Content items from strings (text), ints (an image index, as ``kind``: "image" or "latent") and ready dicts;
    neighbouring strings are joined with a space (not into an observation span), blank ones dropped."""
    out = []
    for x in items:
        if isinstance(x, str):
            x = x.strip()
            if not x:
                continue
            if out and out[-1]["type"] == "text" and not out[-1].get("observation"):
                out[-1]["text"] += " " + x
                continue
            out.append({"type": "text", "text": x})
        else:
            out.append(x if isinstance(x, dict) else {"type": kind, "image": x})
    return out


def make_record(rid: str, task: str, images: list[str], user: list, assistant: list, answer: str, meta: dict,
                system: str | None = None, conclude: bool = True) -> dict:
    """A record of ``shared/DESIGN.md`` with one user and one assistant turn (see ``content`` for the items); the
    assistant turn ends with "The answer is X." unless ``conclude`` is false (the answer as the source wrote it)."""
    messages = [{"role": "system", "content": content([system], "image")}] if system else []
    ending = [f"The answer is {answer}."] if conclude else []
    messages += [{"role": "user", "content": content(user, "image")},
                 {"role": "assistant", "content": content([*assistant, *ending], "latent")}]
    return {"id": rid, "images": images, "messages": messages, "answer": answer, "task": task, "meta": meta}


def multiple_choice(stem: str, options: list[str]) -> str:
    return stem + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic tasks


def split_counts(n: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    val = round(n * fractions[1])
    test = min(round(n * fractions[2]), n - val)
    return {"train": n - val - test, "val": val, "test": test}


def fewest_examples(fractions: tuple[float, float, float]) -> int:
    """The smallest ``--n`` that ``split_counts`` gives every split with a non-zero fraction an example of."""
    return next(n for n in itertools.count(1)
                if all(count or not f for count, f in zip(split_counts(n, fractions).values(), fractions)))


def synthesize(args, name: str, version: int, targets: list, sample: Callable, render: Callable) -> None:
    """Build ``args.n`` examples: example i of a split aims at ``targets[i % len(targets)]`` (a question type and its
    answer), so answers come out balanced; ``sample(rng, target)`` draws a puzzle meeting it (or None), and a puzzle
    whose ``key`` was seen before, in any split, is drawn again. ``render(puzzle, rid, writer)`` saves its images and
    returns the record; puzzles are rendered one at a time, so memory stays flat."""
    rng = random.Random(args.seed)
    seen: set[bytes] = set()
    with DatasetWriter(args.out, name, version, args) as writer, tqdm(total=args.n, desc=name, unit="ex") as bar:
        for split, count in split_counts(args.n, args.split).items():
            for i in range(count):
                target = targets[i % len(targets)]
                for _ in range(MAX_TRIES):
                    puzzle = sample(rng, target)
                    if puzzle is None:
                        continue
                    key = hashlib.blake2b(repr(puzzle.key).encode(), digest_size=16).digest()
                    if key not in seen:
                        break
                else:
                    raise BuildError(f"found no new {name} example for {target} in {MAX_TRIES} draws after "
                                     f"{len(seen)} distinct ones; ask for fewer examples (--n) or a larger task")
                seen.add(key)
                writer.write(split, render(puzzle, f"{name}-{split}-{i:06d}", writer))
                bar.update()


def cycle_targets(groups: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Interleave question types, each cycling through its answers: every type and, within it, every answer gets
    the same share of any long enough run."""
    width = max(len(answers) for answers in groups.values())
    while any(width % len(answers) for answers in groups.values()):
        width += 1
    return [(q, answers[k % len(answers)]) for k in range(width) for q, answers in groups.items()]


# ---------------------------------------------------------------------------------------------------------------------
# Converters


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a ``.json`` list, a ``.jsonl`` file or a ``.parquet`` file. A broken JSON line is
    reported as a bad record; a ``.json`` file that does not parse is an error naming the file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=64)
            n = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield f"{path.name} row {n}", row
                    n += 1
        except OSError as e:  # pyarrow.ArrowInvalid is an OSError subclass
            raise BuildError(f"{path}: not a readable parquet file ({e})") from None
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield f"{path.name} line {n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"{path.name} line {n}", BadRecord(f"invalid JSON ({e})")
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BuildError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(rows, list):
            raise BuildError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
        for n, row in enumerate(rows):
            yield f"{path.name} item {n}", row
    else:
        raise BuildError(f"{path}: unknown source format {suffix!r}; expected .json, .jsonl or .parquet")


class Converted:
    """What a converter's ``to_record`` works with: the record id (for naming images) and image copying."""

    def __init__(self, writer: DatasetWriter, image_root: Path, rid: str, copied: set, allow_outside: list[Path]):
        self.writer, self.image_root, self.rid, self.copied = writer, image_root, rid, copied
        self.allow_outside = allow_outside  # folders besides image_root that images may come from

    def image(self, value: Any, field: str) -> str:
        """Copy a source image into ``images/`` and return its record path. ``value`` is a path (relative to the
        image root, or absolute), ``{"path": ...}``, or ``{"bytes": ...}`` as HF parquet files store images."""
        if isinstance(value, dict) and value.get("bytes"):
            data = value["bytes"]
            try:
                with Image.open(io.BytesIO(data)) as im:
                    ext = "." + (im.format or "png").lower()
            except Exception as e:  # PIL raises many types for non-images
                raise BadRecord(f"{field}: embedded bytes are not an image ({type(e).__name__})") from None
            rel, dest = self.writer.image_path(safe_id(f"{self.rid}-{field}"), ext)
            dest.write_bytes(data)
            return rel
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str) or not path:
            raise BadRecord(f"{field}: expected an image path, got {value!r}")
        from vlatent.data.records import confined, image_problem  # torch-free builders stay light until a conversion

        if not confined(self.image_root / path, self.image_root, self.allow_outside):
            raise BadRecord(f"{field}: {path!r} lies outside the image root {str(self.image_root)!r} (pass "
                            "--allow-outside FOLDER to copy images from another folder)")
        source = (self.image_root / path).resolve()
        if source not in self.copied and (problem := image_problem(source)):
            raise BadRecord(f"{field}: {problem}")
        # Images shared by many records (LLaVA's COCO pictures) are copied once, under a name from their source path.
        name = hashlib.blake2b(str(source).encode(), digest_size=8).hexdigest()
        rel, dest = self.writer.image_path(name, source.suffix.lower())
        if source not in self.copied:
            shutil.copyfile(source, dest)
            self.copied.add(source)
        return rel


def convert(args, name: str, version: int, to_record: Callable[[Any, Converted], dict],
            row_id: Callable[[Any, int], str]) -> None:
    """Map every source row to a record with ``to_record`` and write it to a split chosen by a seeded hash of its id
    (streaming, so the split of a record never depends on the others). A row it cannot map stops the build with the
    row and the reason, or with ``--skip-bad`` is counted and skipped. A dataset is never built over its own source."""
    image_root = (args.images or args.source.parent).resolve()
    out = args.out.resolve()
    if existing_outputs(out) and any(p == out or out in p.parents for p in (args.source.resolve(), image_root)):
        raise BuildError(f"--out {args.out} holds a dataset and this build's source (--source / --images), which "
                         "replacing the dataset could delete; write to another --out")
    ids, copied, skipped = set(), set(), 0
    fractions = args.split
    with DatasetWriter(args.out, name, version, args, {"source": str(args.source)}) as writer:
        for n, (where, row) in enumerate(tqdm(read_rows(args.source), desc=name, unit="rec")):
            try:
                if isinstance(row, BadRecord):
                    raise row
                if not isinstance(row, dict):
                    raise BadRecord(f"expected a JSON object, got {type(row).__name__}")
                rid = row_id(row, n)
                if rid in ids:
                    raise BadRecord(f"duplicate id {rid!r}")
                record = to_record(row, Converted(writer, image_root, rid, copied, args.allow_outside))
            except BadRecord as e:
                if not args.skip_bad:
                    raise BuildError(f"cannot convert {where}: {e} (pass --skip-bad to skip such records)") from None
                skipped += 1
                if skipped <= SHOWN_BAD:
                    tqdm.write(f"skipping {where}: {e}", file=sys.stderr)
                continue
            ids.add(rid)
            draw = int.from_bytes(hashlib.blake2b(f"{args.seed}:{rid}".encode(), digest_size=8).digest(), "big") / 2**64
            split = "train" if draw < fractions[0] else "val" if draw < fractions[0] + fractions[1] else "test"
            writer.write(split, record)
        writer.info["skipped"] = skipped
    if args.skip_bad:
        print(f"skipped {skipped} record(s) that could not be converted", file=sys.stderr)


def interleave(texts: list[str], images: list[int]) -> list:
    """``[t0, i0, t1, i1, ..., tn]``: text split at image markers, with the images back where the markers were."""
    out = [texts[0]]
    for image, text in zip(images, texts[1:]):
        out += [image, text]
    return out


def boxed_answer(text: str) -> tuple[str, str | None]:
    """Unwrap every ``\\boxed{X}`` in ``text`` to ``X`` (braces may nest), and drop one that stands alone at the end
    (the record ends with "The answer is X." anyway); return the text and the last X (None when there is none)."""
    out, answer, i = [], None, 0
    while (start := text.find("\\boxed{", i)) != -1:
        depth, j = 1, start + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            break  # unbalanced: leave the rest as it is
        answer = text[start + len("\\boxed{"): j - 1].strip()
        alone = not text[j:].strip(" \n\t.$") and text[:start].rstrip(" \n\t$")[-1:] in ("", ".", "!", "?", ":")
        out += [text[i:start].rstrip(" $"), ""] if alone else [text[i:start], answer]
        i = len(text) if alone else j
    return "".join(out) + text[i:], answer


def safe_id(text: str) -> str:
    """A record id from source fields: keeps letters, digits and ``-_.``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))
