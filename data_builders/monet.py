"""Convert Monet-SFT-125K into vlatent records: auxiliary images become latent steps, observations are marked.

Source schema (huggingface.co/datasets/NOVAglow646/Monet-SFT-125K, github.com/NOVAglow646/Monet), a JSON list (or
JSONL) of::

    {"data": [{"role": "system", "content": [{"type": "text", "text": "..."}]},
              {"role": "user", "content": [{"type": "image", "image_file_name": "x/q.jpg"},
                                           {"type": "text", "text": "Question ... \\\\boxed{}."}]},
              {"role": "assistant", "content": [
                  {"type": "text", "text": "Let me zoom in. <abs_vis_token></abs_vis_token>"},
                  {"type": "image", "image_file_name": "x/crop.jpg"},
                  {"type": "text", "text": "<observation>It reads 42.</observation> So \\\\boxed{42}."}]}],
     "metadata": {"dataset_name": "Zebra_CoT_count", "sample_id": 17}}

Images are ``{"type": "image", "image": path}`` or, as released, ``"image_file_name"``, relative to --images.
Mapping: every assistant image must stand right after ``<abs_vis_token></abs_vis_token>`` (Monet's loader drops
samples where it does not) and becomes a latent step; ``<observation>...</observation>`` spans after it become text
segments with ``"observation": true`` (before the first auxiliary image the tags are dropped, as Monet's loader does);
the last ``\\boxed{X}`` is the answer, unwrapped to X in the text (dropped where it stands alone at the end), and the
turn ends with "The answer is X.". The task is ``dataset_name``.

    vlatent build-data monet --source Monet-SFT-125K/train.json --images Monet-SFT-125K --out data/monet
"""

from __future__ import annotations

import re
import sys

from . import common
from .common import BadRecord

VERSION = 1
TOKEN = "<abs_vis_token></abs_vis_token>"
SPAN = re.compile(r"<observation>(.*?)</observation>", re.S)


def text_items(text: str, observed: bool) -> list:
    """Text split into plain strings and observation segments (dicts); tags dropped when nothing was observed yet."""
    if text.count("<observation>") != text.count("</observation>") or SPAN.sub("", text).count("observation>"):
        raise BadRecord(f"unbalanced <observation> tags in {text[:80]!r}")
    items, i = [], 0
    for m in SPAN.finditer(text):
        items.append(text[i:m.start()])
        span = m.group(1).strip()
        if span:
            items.append({"type": "text", "text": span, "observation": True} if observed else span)
        i = m.end()
    return items + [text[i:]]


def to_record(row: dict, src: common.Converted) -> dict:
    turns = row.get("data")
    roles = [t.get("role") if isinstance(t, dict) else None for t in turns] if isinstance(turns, list) else None
    if roles not in (["system", "user", "assistant"], ["user", "assistant"]):
        raise BadRecord(f"data must be [system, user, assistant] turns, got roles {roles}")
    images, system, user, assistant, answer, cot = [], None, [], [], None, []
    for m, turn in enumerate(turns):
        items = turn.get("content")
        items = [{"type": "text", "text": items}] if isinstance(items, str) else items
        if not isinstance(items, list):
            raise BadRecord(f"data[{m}].content must be a list")
        observed = False
        for c, item in enumerate(items):
            at = f"data[{m}].content[{c}]"
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                text = item["text"]
                if turn["role"] == "system":
                    system = f"{system} {text}" if system else text
                elif turn["role"] == "user":
                    user.append(text)
                else:
                    text, boxed = common.boxed_answer(text.replace(TOKEN, " "))
                    answer = boxed or answer
                    assistant += text_items(text, observed)
                    cot.append(SPAN.sub(r"\1", text))
            elif kind == "image" and turn["role"] in ("user", "assistant"):
                if turn["role"] == "assistant":
                    before = items[c - 1].get("text", "") if c and isinstance(items[c - 1], dict) else ""
                    if TOKEN not in before:
                        raise BadRecord(f"{at}: an assistant image must follow {TOKEN} in the text before it")
                    observed = True
                images.append(src.image(item.get("image", item.get("image_file_name")), at))
                (user if turn["role"] == "user" else assistant).append(len(images) - 1)
            else:
                raise BadRecord(f"{at}: cannot map a {kind!r} item in a {turn['role']!r} turn")
    if answer is None:
        raise BadRecord("the assistant turn has no \\boxed{} answer")
    meta_in = row.get("metadata") or {}
    meta = {"dataset_name": str(meta_in.get("dataset_name", "")), "sample_id": str(meta_in.get("sample_id", "")),
            "text_cot": " ".join(" ".join(cot).split()) + f" The answer is {answer}."}
    return common.make_record(src.rid, meta["dataset_name"] or "monet", images, user, assistant, answer, meta,
                              system=system)


def row_id(row: dict, n: int) -> str:
    meta = row.get("metadata") or {}
    if "dataset_name" in meta and "sample_id" in meta:
        return common.safe_id(f"{meta['dataset_name']}-{meta['sample_id']}")
    return f"monet-{n:06d}"


def build(args) -> None:
    common.convert(args, "monet", VERSION, to_record, row_id)


def main(argv: list[str] | None = None) -> int:
    return common.run(common.converter_parser("monet", __doc__), build, argv)


if __name__ == "__main__":
    sys.exit(main())
