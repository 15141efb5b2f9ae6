"""Convert LLaVA / ShareGPT conversations into vlatent records (text only: no latent steps).

Source schema (LLaVA-Instruct, e.g. ``llava_v1_5_mix665k.json``), a JSON list (or JSONL) of::

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",          # optional; a list for several images
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

Mapping: ``human``/``user`` turns become user turns, ``gpt``/``assistant`` assistant turns and ``system`` a system
turn; each ``<image>`` in a user turn is the next image, and images no turn marks go first in the first user turn
(LLaVA's convention). The answer is the last assistant message; the text is kept as it is (no "The answer is"
line: these are free-form conversations).

    vlatent build-data llava --source llava_v1_5_mix665k.json --images data/llava-images --out data/llava
"""

from __future__ import annotations

import sys

from . import common
from .common import BadRecord

VERSION = 1
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_record(row: dict, src: common.Converted, task: str) -> dict:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("conversations must be a non-empty list")
    sources = row.get("image")
    sources = [] if sources is None else sources if isinstance(sources, list) else [sources]
    images = [src.image(p, f"image[{i}]") for i, p in enumerate(sources)]
    marked = sum(t.get("value", "").count("<image>") for t in turns if isinstance(t, dict)
                 and isinstance(t.get("value"), str))
    if marked > len(images):
        raise BadRecord(f"{marked} <image> marker(s) but {len(images)} image(s)")
    unmarked = list(range(len(images) - marked))
    messages, nxt = [], len(unmarked)
    for k, turn in enumerate(turns):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise BadRecord(f"conversations[{k}]: expected from = human, gpt or system and a string value")
        parts = value.split("<image>")
        if role != "user" and len(parts) > 1:
            raise BadRecord(f"conversations[{k}]: <image> in a {turn['from']} turn")
        items = common.interleave(parts, list(range(nxt, nxt + len(parts) - 1)))
        nxt += len(parts) - 1
        if role == "user" and unmarked:
            items, unmarked = unmarked + items, []
        messages.append({"role": role, "content": common.content(items, "image")})
        if not messages[-1]["content"]:
            raise BadRecord(f"conversations[{k}] is empty")
    if unmarked:
        raise BadRecord("images but no human turn to put them in")
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise BadRecord("no gpt turn, so nothing to train on")
    answer = " ".join(item["text"] for item in answers[-1]["content"])
    return {"id": src.rid, "images": images, "messages": messages, "answer": answer, "task": task,
            "meta": {"text_cot": answer}}


def parser():
    p = common.converter_parser("llava", __doc__)
    p.add_argument("--task", default="llava", help="task name for the records")
    return p


def build(args) -> None:
    common.convert(args, "llava", VERSION, lambda row, src: to_record(row, src, args.task),
                   lambda row, n: common.safe_id(row.get("id") or f"{args.task}-{n:06d}"))


def main(argv: list[str] | None = None) -> int:
    return common.run(parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
