"""Convert Mirage's released JSONL (VSP, jigsaw, SAT, ...) into vlatent records with one latent step.

Source schema (github.com/UMass-Embodied-AGI/Mirage), one JSON object per line::

    {"text_input":  "<image>\\nQuestion ...",            # <image> marks where each input image goes
     "image_input": "imgs/q.png" | ["a.png", "b.png"],   # paths, relative to --images
     "text_output": "<think>... <output_image> ...</think> \\\\boxed{B}",
     "image_output": "imgs/helper.png",                   # the helper image (or a list, one per <output_image>)
     "map_desc": [[1, 0], [-1, 2]]}                       # VSP rows only: 1 start, 2 goal, -1 hole, 0 ice

Mapping: input images go where ``<image>`` stands (any without a marker go first, as Mirage's own loader puts them);
each ``<output_image>`` becomes a latent step on the helper image, or, with no marker, the single helper image comes
first in the answer (again as Mirage's loader does); ``<think>`` tags are dropped. The last ``\\boxed{X}`` is the
answer: it is unwrapped to X in the text (dropped where it stands alone at the end) and the turn ends with "The
answer is X.". With ``--keep-boxed`` the text stays as written, as Mirage trains on it (src/task.py:22): ``<think>``
tags and ``\\boxed{X}`` kept, nothing added (the record's ``answer`` is still X). ``map_desc`` is kept in ``meta``.

    vlatent build-data mirage --source vsp_train.jsonl --images data/mirage --out data/mirage-vsp --task vsp
"""

from __future__ import annotations

import sys

from . import common
from .common import BadRecord

VERSION = 1


def as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def to_record(row: dict, src: common.Converted, task: str, keep_boxed: bool = False) -> dict:
    text_in, text_out = row.get("text_input"), row.get("text_output")
    if not isinstance(text_in, str) or not isinstance(text_out, str):
        raise BadRecord("text_input and text_output must be strings")
    inputs, outputs = as_list(row.get("image_input")), as_list(row.get("image_output"))
    images = [src.image(p, f"image_input[{i}]") for i, p in enumerate(inputs)]
    parts = text_in.split("<image>")
    if len(parts) - 1 > len(inputs):
        raise BadRecord(f"text_input has {len(parts) - 1} <image> markers but image_input has {len(inputs)} image(s)")
    unmarked = len(inputs) - (len(parts) - 1)
    user = list(range(unmarked)) + common.interleave(parts, list(range(unmarked, len(inputs))))
    text, answer = common.boxed_answer(text_out.replace("<think>", " ").replace("</think>", " "))
    if keep_boxed:
        text = text_out
    if answer is None:
        raise BadRecord("text_output has no \\boxed{} answer")
    pieces = text.split("<output_image>")
    marked = len(pieces) - 1
    if (marked and marked != len(outputs)) or (not marked and len(outputs) > 1):
        raise BadRecord(f"text_output has {marked} <output_image> marker(s) for {len(outputs)} image_output image(s)")
    helpers = [len(images) + j for j in range(len(outputs))]
    images += [src.image(p, f"image_output[{j}]") for j, p in enumerate(outputs)]
    assistant = common.interleave(pieces, helpers) if marked else helpers + pieces
    cot = " ".join(" ".join(pieces).split())
    meta = {"text_cot": cot if keep_boxed else cot + f" The answer is {answer}."}
    if "map_desc" in row:
        meta["map_desc"] = row["map_desc"]
    return common.make_record(src.rid, task, images, user, assistant, answer, meta, conclude=not keep_boxed)


def parser():
    p = common.converter_parser("mirage", __doc__)
    p.add_argument("--task", default="mirage", help="task name for the records (e.g. vsp, jigsaw)")
    p.add_argument("--keep-boxed", action="store_true",
                   help="keep text_output as written (<think> tags, \\boxed{X}) instead of 'The answer is X.'")
    return p


def build(args) -> None:
    common.convert(args, "mirage", VERSION, lambda row, src: to_record(row, src, args.task, args.keep_boxed),
                   lambda row, n: common.safe_id(row.get("id") or f"{args.task}-{n:06d}"))


def main(argv: list[str] | None = None) -> int:
    return common.run(parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
