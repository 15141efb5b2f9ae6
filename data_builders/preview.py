"""Draw a grid of examples: per row the question image(s), the helper images in order, the question and answer.

    vlatent build-data preview data/maze --n 16 --out grid.png
"""

from __future__ import annotations

import json
import sys
import textwrap

from PIL import Image

from . import common


def preview(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlatent.data import RecordError, validate_record

    path = args.dir / f"{args.split}.jsonl"
    if not path.is_file():
        raise common.BuildError(f"no {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in zip(range(args.n), f):
            try:
                records.append(validate_record(json.loads(line), args.dir, f"{path.name} line {n + 1}"))
            except (RecordError, json.JSONDecodeError) as e:
                raise common.BuildError(f"{path.name} line {n + 1}: {e}") from None
    if not records:
        raise common.BuildError(f"{path} has no records")

    rows = []  # per record: [(title, image path)], caption
    for r in records:
        user = [c for m in r["messages"] if m["role"] == "user" for c in m["content"]]
        steps = [c["image"] for m in r["messages"] for c in m["content"] if c["type"] == "latent"]
        shown = [("question", r["images"][c["image"]]) for c in user if c["type"] == "image"]
        shown += [(f"latent {k}", r["images"][i]) for k, i in enumerate(steps, start=1)]
        if len(shown) > args.max_images:  # keep the first ones and the last
            shown = shown[:args.max_images - 1] + shown[-1:]
        question = " ".join(c["text"] for c in user if c["type"] == "text")
        lines = [w for line in question.splitlines() for w in textwrap.wrap(line, 44)]
        caption = "\n".join(lines[:16]) + f"\nanswer: {r.get('answer')}"
        rows.append((shown, caption))
    cols = max(len(shown) for shown, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 3.4 * len(rows)), squeeze=False,
                             layout="constrained")
    for (shown, caption), line in zip(rows, axes):
        for ax in line:
            ax.axis("off")
        for ax, (title, image) in zip(line, shown):
            with Image.open(image) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_title(title, fontsize=8)
        line[0].text(0, -0.04, caption, transform=line[0].transAxes, fontsize=5.5, va="top", family="monospace")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}: {len(rows)} examples from {path}")


def main(argv: list[str] | None = None) -> int:
    p = common.tool_parser("preview", __doc__)
    p.add_argument("dir", type=common.existing_dir, help="the dataset folder")
    p.add_argument("--n", type=common.positive_int, default=16, help="examples to draw (the first ones)")
    p.add_argument("--split", choices=common.SPLITS, default="train")
    p.add_argument("--out", type=common.output_file, default="preview.png", help="PNG to write")
    p.add_argument("--max-images", type=common.positive_int, default=8, help="images per row at most")
    return common.run(p, preview, argv)


if __name__ == "__main__":
    sys.exit(main())
