"""Counting: scenes of coloured circles, squares and triangles; "How many red circles are there?"

Besides the counted kind each scene holds look-alikes (the same colour in another shape, the same shape in another
colour) and other objects, none overlapping. The helper image is the scene with every counted object boxed and
numbered; ``meta.boxes`` keeps those boxes ``[x0, y0, x1, y1]`` for box-token methods.

    vlatent build-data count --out data/count --n 1000 --max-count 6 --max-objects 14
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from . import common

VERSION = 1
SIDE = 192
COLORS = {"red": (215, 45, 45), "green": (45, 160, 60), "blue": (45, 85, 215), "yellow": (235, 195, 30),
          "purple": (145, 65, 185)}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    things: tuple[Thing, ...]
    color: str
    shape: str
    answer: str

    @property
    def key(self):
        return self.things, self.color, self.shape


def place(rng, kinds: list[tuple[str, str]]) -> tuple[Thing, ...] | None:
    """Put objects of the given kinds at random, 4 px apart at least; None when they do not fit."""
    things = []
    for color, shape in kinds:
        for _ in range(100):
            s = rng.randint(18, 28)
            x, y = rng.randrange(4, SIDE - s - 4), rng.randrange(4, SIDE - s - 4)
            box = (x, y, x + s, y + s)
            if all(box[2] + 4 < b[0] or b[2] + 4 < box[0] or box[3] + 4 < b[1] or b[3] + 4 < box[1]
                   for b in (t.box for t in things)):
                things.append(Thing(color, shape, box))
                break
        else:
            return None
    return tuple(things)


def sample(rng, target, max_objects: int) -> Scene | None:
    """A scene with exactly ``target[1]`` objects of a random colour and shape."""
    n = int(target[1])
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    others = [(c, s) for c in COLORS for s in SHAPES if (c, s) != (color, shape)]
    look_alikes = [(c, s) for c, s in others if c == color or s == shape]
    most = max(2, max_objects - n)
    extra = rng.randint(min(max(2, max_objects // 3), most), most)
    kinds = [(color, shape)] * n + [rng.choice(look_alikes if rng.random() < 0.6 else others) for _ in range(extra)]
    rng.shuffle(kinds)
    things = place(rng, kinds)
    return Scene(things, color, shape, target[1]) if things else None


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def where(box) -> str:
    """Rough position in words: "top left", "centre", "bottom right", ..."""
    cx, cy = (box[0] + box[2]) / 2 / SIDE, (box[1] + box[3]) / 2 / SIDE
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def render(s: Scene, rid: str, writer: common.DatasetWriter) -> dict:
    scene = Image.new("RGB", (SIDE, SIDE), (245, 245, 240))
    d = ImageDraw.Draw(scene)
    for t in s.things:
        x0, y0, x1, y1 = t.box
        if t.shape == "circle":
            d.ellipse(t.box, fill=COLORS[t.color])
        elif t.shape == "square":
            d.rectangle(t.box, fill=COLORS[t.color])
        else:
            d.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=COLORS[t.color])
    counted = sorted((t.box for t in s.things if (t.color, t.shape) == (s.color, s.shape)), key=lambda b: (b[1], b[0]))
    boxed = scene.copy()
    d = ImageDraw.Draw(boxed)
    font = ImageFont.load_default(10)
    for k, (x0, y0, x1, y1) in enumerate(counted, start=1):
        d.rectangle([x0 - 3, y0 - 3, x1 + 3, y1 + 3], outline=(0, 0, 0), width=2)
        d.text((x0 - 2, y0 - 3), str(k), fill=(0, 0, 0), font=font, anchor="lb")
    images = [writer.save(scene, rid), writer.save(boxed, f"{rid}-boxes")]
    name = f"{s.color} {s.shape}s"
    near = {}
    for t in s.things:
        if (t.color == s.color) != (t.shape == s.shape):  # a look-alike
            near[f"{t.color} {t.shape}"] = near.get(f"{t.color} {t.shape}", 0) + 1
    found = "; ".join(f"{k}: {where(b)}" for k, b in enumerate(counted, start=1))
    ignored = ", ".join(plural(n, kind) for kind, n in sorted(near.items()))
    cot = (f"Looking for {name} one by one, top to bottom: {found}. "
           + (f"The look-alikes ({ignored}) do not count. " if ignored else "")
           + f"That makes {plural(len(counted), f'{s.color} {s.shape}')}.")
    steps = [f"Let me mark every {s.color} {s.shape} with a box.", 1, f"Counting the boxes gives {len(counted)}."]
    meta = {"question_type": "count", "color": s.color, "shape": s.shape, "boxes": [list(b) for b in counted],
            "objects": len(s.things), "text_cot": f"{cot} The answer is {s.answer}."}
    question = f"How many {name} are there in the image? Answer with a number."
    return common.make_record(rid, "count", images, [0, question], steps, s.answer, meta)


def parser():
    p = common.synthetic_parser("count", __doc__)
    p.add_argument("--max-count", type=common.positive_int, default=6, help="answers run from 1 to this")
    p.add_argument("--max-objects", type=common.positive_int, default=14, help="objects per scene at most")
    return p


def build(args) -> None:
    if args.max_objects < args.max_count + 2:
        raise common.BuildError(f"--max-objects ({args.max_objects}) must leave room for the counted objects and "
                                f"two others: at least --max-count + 2 = {args.max_count + 2}")
    if args.max_objects > 30:
        raise common.BuildError(f"--max-objects {args.max_objects} do not fit on a {SIDE}px scene; use 30 or fewer")
    targets = [("count", str(k)) for k in range(1, args.max_count + 1)]
    common.synthesize(args, "count", VERSION, targets, lambda rng, t: sample(rng, t, args.max_objects), render)


def main(argv: list[str] | None = None) -> int:
    return common.run(parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
