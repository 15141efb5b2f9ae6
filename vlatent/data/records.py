"""The record schema: one example = images + chat messages that interleave text, images and latent segments.

A record is checked once, when its dataset is opened, so that training never meets a malformed example; every
error names the record (its id, or its line when the id is unusable), where it came from and the field at fault.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image", "latent")
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard as the demo's, read from the header (load_records' argument)
MAX_ASPECT_RATIO = 200  # the Qwen-VL image processors refuse a longer side over 200x the shorter


class RecordError(ValueError):
    """A record breaks the schema, or can no longer be read; the message names the record and the field."""


def record_error(record_id: str | None, where: str, field: str, problem: str) -> RecordError:
    """``record 'maze-000017' (train.jsonl line 3): messages[1].content[1].image: <problem>``"""
    if record_id is not None:
        who = f"record {record_id!r}" + (f" ({where})" if where else "")
    else:
        who = f"record at {where}" if where else "record"
    return RecordError(f"{who}: {field}: {problem}")


def image_problem(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """What is wrong with the image file at ``path``, or None when PIL can read it and its size is usable."""
    if not path.is_file():
        return f"image file {str(path)!r} does not exist"
    try:
        with Image.open(path) as im:
            w, h = im.size
            im.verify()
    except Exception as e:  # PIL raises many types for truncated or non-image files
        return f"image file {str(path)!r} is not a readable image ({type(e).__name__}: {e})"
    if w * h > max_pixels:
        return (f"image file {str(path)!r} is {w}x{h} pixels, over the {max_pixels:,}-pixel limit (decompression-bomb "
                "guard; raise load_records' max_image_pixels to allow it)")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        return (f"image file {str(path)!r} is {w}x{h} pixels: an aspect ratio over {MAX_ASPECT_RATIO}, which the model "
                "cannot take")
    return None


def confined(path: Path, root: Path, allow_outside: Iterable[str | os.PathLike] = ()) -> bool:
    """Whether ``path`` (symlinks resolved) lies in ``root`` or in one of the ``allow_outside`` folders."""
    real = path.resolve()
    return any(real.is_relative_to(Path(folder).resolve()) for folder in (root, *allow_outside))


def validate_record(record: Any, root: str | os.PathLike | None, where: str = "", *, check_images: bool = True,
                    allow_outside: Iterable[str | os.PathLike] = (), max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """Check one record and return a copy with absolute image paths and content items without None fields.

    ``root`` is the folder relative image paths start from, and the one every image must lie in (symlinks resolved)
    unless it lies in an ``allow_outside`` folder; None: paths must be absolute, and are not confined. ``where`` says
    where the record came from (``"train.jsonl line 3"``) and goes into every error. ``check_images=False`` skips
    opening the image files (a file gone missing is then reported by the collator).
    """
    if not isinstance(record, dict):
        raise record_error(None, where, "record", f"expected a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if rid is None:
        raise record_error(None, where, "id", "missing")
    if not isinstance(rid, str) or not rid:
        raise record_error(None, where, "id", f"expected a non-empty string, got {rid!r}")

    def fail(field: str, problem: str) -> RecordError:
        return record_error(rid, where, field, problem)

    images = record.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise fail("images", f"expected a list of path strings, got {images!r}")
    resolved = []
    for i, p in enumerate(images):
        path = Path(p)
        if not path.is_absolute():
            if root is None:
                raise fail(f"images[{i}]", f"relative path {p!r} needs a root folder (pass root=)")
            path = Path(root) / path
        if root is not None and not confined(path, Path(root), allow_outside):
            raise fail(f"images[{i}]", f"{p!r} lies outside the dataset folder {str(root)!r} (pass --allow-outside "
                                       "FOLDER, allow_outside= in Python, to read images from another folder)")
        path = path.resolve()
        if check_images and (problem := image_problem(path, max_image_pixels)):
            raise fail(f"images[{i}]", problem)
        resolved.append(str(path))

    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise fail("messages", f"expected a non-empty list of turns, got {messages!r}")
    clean_messages = []
    for m, msg in enumerate(messages):
        at = f"messages[{m}]"
        if not isinstance(msg, dict):
            raise fail(at, f"expected an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise fail(f"{at}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = msg.get("content")
        if not isinstance(content, list):
            raise fail(f"{at}.content", f"expected a list of content items, got {type(content).__name__}")
        items = []
        for c, item in enumerate(content):
            at_c = f"{at}.content[{c}]"
            if not isinstance(item, dict):
                raise fail(at_c, f"expected an object, got {type(item).__name__}")
            # Arrow-backed datasets give every item the union of all fields, the missing ones as None.
            item = {k: v for k, v in item.items() if v is not None}
            kind = item.get("type")
            if kind not in CONTENT_TYPES:
                raise fail(f"{at_c}.type", f"unknown content type {kind!r}; expected one of {', '.join(CONTENT_TYPES)}")
            if kind == "text" and not isinstance(item.get("text"), str):
                raise fail(f"{at_c}.text", f"expected a string, got {item.get('text')!r}")
            if kind == "text" and not item["text"].isascii():
                try:
                    item["text"].encode("utf-8")
                except UnicodeEncodeError as e:
                    raise fail(f"{at_c}.text", f"character {e.start} is a lone UTF-16 surrogate "
                                               f"({item['text'][e.start]!r}), not text") from None
            if kind in ("image", "latent"):
                idx = item.get("image")
                if not isinstance(idx, int) or isinstance(idx, bool):
                    raise fail(f"{at_c}.image", f"expected an integer index into images, got {idx!r}")
                if not 0 <= idx < len(resolved):
                    raise fail(f"{at_c}.image", f"index {idx} out of range for {len(resolved)} images")
            if kind == "latent" and role != "assistant":
                raise fail(at_c, f"latent segment in a {role} turn; latents belong to assistant turns")
            if "observation" in item and not isinstance(item["observation"], bool):
                raise fail(f"{at_c}.observation", f"expected true or false, got {item['observation']!r}")
            items.append(item)
        if role == "assistant" and all(it["type"] == "text" and not it["text"].strip() for it in items):
            raise fail(f"{at}.content", "empty assistant turn (no content, or only empty text)")
        clean_messages.append({**msg, "content": items})
    roles = [msg["role"] for msg in clean_messages]
    if "assistant" not in roles:
        raise fail("messages", "no assistant turn, so nothing to train on")
    if "user" not in roles[: roles.index("assistant")]:
        raise fail("messages", "the first assistant turn has no user turn before it")
    return {**record, "images": resolved, "messages": clean_messages}


def load_records(
    source: str | os.PathLike | Iterable[dict],
    *,
    split: str | None = None,
    root: str | os.PathLike | None = None,
    check_images: bool = True,
    allow_outside: Iterable[str | os.PathLike] = (),
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> list[dict]:
    """Open a dataset and validate every record: a ``.jsonl`` file, a folder with ``split="train"`` (reads
    ``train.jsonl``), or an HF ``datasets.Dataset`` / list of dicts with the same columns.

    Relative image paths start from the jsonl's folder, or from ``root`` (required for relative paths in a
    dataset); images must lie in that folder or in an ``allow_outside`` one, and hold at most ``max_image_pixels``.
    Returns the records with absolute image paths; raises ``RecordError`` at the first bad record.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            if split is None:
                raise ValueError(f"{str(path)!r} is a folder: pass split= to pick '{{split}}.jsonl' inside it")
            path = path / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no dataset file at {str(path)!r}")
        rows = _read_jsonl(path)
        root = path.parent if root is None else root
    else:
        rows = ((f"row {i}", row) for i, row in enumerate(source))

    records, seen = [], {}
    for where, row in rows:
        rec = validate_record(row, root, where, check_images=check_images, allow_outside=allow_outside,
                              max_image_pixels=max_image_pixels)
        if rec["id"] in seen:
            raise record_error(rec["id"], where, "id", f"duplicate id, first used at {seen[rec['id']]}")
        seen[rec["id"]] = where
        records.append(rec)
    return records


def _read_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise record_error(None, where, "line", f"byte {e.start} is not UTF-8 ({raw[e.start:e.start + 1]!r}); "
                                   "records are UTF-8 JSON") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise record_error(None, where, "line", f"invalid JSON ({e})") from None


def present(records: list[dict], how: str) -> list[dict]:
    """One view of built records for training: ``as_built``; ``answer_only`` (the assistant turn is just "The answer
    is X."); ``text_cot`` (the turn is the builder's written-out reasoning, ``meta.text_cot``: a text chain-of-thought
    baseline, since the text around latent steps says little on its own); ``observations`` (the text right after each
    latent step marked as a Monet observation span)."""
    if how == "as_built":
        return records
    out = copy.deepcopy(records)
    for r in out:
        turn = r["messages"][-1]["content"]
        if how == "answer_only":
            r["messages"][-1]["content"] = [{"type": "text", "text": f"The answer is {r['answer']}."}]
        elif how == "text_cot":
            cot = (r.get("meta") or {}).get("text_cot")
            if not isinstance(cot, str) or not cot:
                raise record_error(r.get("id"), "", "meta.text_cot", "is missing: the text_cot view needs the "
                                   "builder's written-out reasoning (every vlatent build-data task writes it)")
            r["messages"][-1]["content"] = [{"type": "text", "text": cot}]
        elif how == "observations":  # what follows a latent step is observed, the closing answer sentence is not
            final = f"The answer is {r['answer']}."
            views = []
            for prev, item in zip([None, *turn], turn):
                if prev is not None and prev["type"] == "latent" and item["type"] == "text":
                    seen = item["text"].removesuffix(final).rstrip()
                    views.append({**item, "text": seen, "observation": True} if seen else item)
                    if seen != item["text"].rstrip():
                        views.append({"type": "text", "text": " " + final})
                else:
                    views.append(item)
            r["messages"][-1]["content"] = views
        else:
            raise ValueError(f"record view {how!r} is not as_built, answer_only, text_cot or observations")
    return out


def write_view(folder: str | os.PathLike, how: str) -> Path:
    """``folder/train.jsonl`` seen through ``present(.., how)``, written beside it as ``train.{how}.jsonl`` (image
    paths stay relative to the folder) unless one newer than ``train.jsonl`` is there; ``as_built`` is the file."""
    folder = Path(folder)
    source = folder / "train.jsonl"
    if how == "as_built":
        return source
    path = folder / f"train.{how}.jsonl"
    if not path.is_file() or path.stat().st_mtime_ns < source.stat().st_mtime_ns:  # a rebuilt dataset: redo it
        records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        tmp = path.with_name(f".{path.name}.{os.getpid()}")  # concurrent bench jobs: each renames a whole file
        tmp.write_text("".join(json.dumps(r) + "\n" for r in present(records, how)))
        os.replace(tmp, path)
    return path
