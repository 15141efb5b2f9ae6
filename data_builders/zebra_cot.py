"""Convert Zebra-CoT interleaved traces into vlatent records: each reasoning image becomes a latent step.

Source schema (huggingface.co/datasets/multimodal-reasoning-lab/Zebra-CoT), parquet as released or JSON/JSONL::

    {"Question": "Which piece fits? <image_start>[problem_image_1]<image_end>",
     "Text Reasoning Trace": "THOUGHT 0: ... <image_start>[reasoning_image_1]<image_end> THOUGHT 1: ...",
     "Final Answer": "B",
     "problem_image_1": ..., "reasoning_image_1": ..., ...}

An image column holds a path relative to --images, ``{"path": ...}``, or ``{"bytes": ...}`` (parquet). Mapping: the
problem images go where the question names them (any it does not name go first), each reasoning image named in the
trace becomes a latent step there, and the turn ends with "The answer is X." for X the final answer (a
``\\boxed{X}`` is unwrapped). The text chain of thought is the trace without the image markers.

    vlatent build-data zebra_cot --source Zebra-CoT/maze.parquet --out data/zebra-maze --task maze
"""

from __future__ import annotations

import re
import sys

from . import common
from .common import BadRecord

VERSION = 1
MARKER = re.compile(r"<image_start>\[([A-Za-z0-9_]+)\]<image_end>")
PROBLEM = re.compile(r"problem_image_(\d+)")


def split_markers(text: str, allowed_prefix: str, row: dict, field: str) -> tuple[list[str], list[str]]:
    """Text pieces around the image markers in ``text``, and the image columns they name (checked to be filled)."""
    parts = MARKER.split(text)
    names = parts[1::2]
    for name in names:
        if not name.startswith(allowed_prefix):
            raise BadRecord(f"{field} names {name}, expected {allowed_prefix}* images only")
        if not row.get(name):
            raise BadRecord(f"{field} names {name}, which is empty or missing")
    return parts[0::2], names


def to_record(row: dict, src: common.Converted, task: str) -> dict:
    question, trace, final = row.get("Question"), row.get("Text Reasoning Trace"), row.get("Final Answer")
    if not all(isinstance(x, str) for x in (question, trace, final)):
        raise BadRecord("Question, Text Reasoning Trace and Final Answer must be strings")
    final, boxed = common.boxed_answer(final)
    answer = (boxed or final).strip()
    if not answer:
        raise BadRecord("Final Answer is empty")
    q_texts, q_names = split_markers(question, "problem_image_", row, "Question")
    t_texts, t_names = split_markers(trace, "reasoning_image_", row, "Text Reasoning Trace")
    unnamed = sorted((k for k in row if PROBLEM.fullmatch(k) and row[k] and k not in q_names),
                     key=lambda k: int(PROBLEM.fullmatch(k).group(1)))
    names = unnamed + q_names + t_names
    images = [src.image(row[name], name) for name in names]
    asked = len(unnamed) + len(q_names)
    user = list(range(len(unnamed))) + common.interleave(q_texts, list(range(len(unnamed), asked)))
    assistant = common.interleave(t_texts, list(range(asked, len(names))))
    meta = {"text_cot": " ".join(" ".join(t_texts).split()) + f" The answer is {answer}."}
    return common.make_record(src.rid, task, images, user, assistant, answer, meta)


def parser():
    p = common.converter_parser("zebra_cot", __doc__)
    p.add_argument("--task", default="zebra_cot", help="task name for the records (e.g. the Zebra-CoT subset)")
    return p


def build(args) -> None:
    common.convert(args, "zebra_cot", VERSION, lambda row, src: to_record(row, src, args.task),
                   lambda row, n: common.safe_id(row.get("id") or f"{args.task}-{n:06d}"))


def main(argv: list[str] | None = None) -> int:
    return common.run(parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
