"""Relative depth: simple shapes standing on a ground plane with two marked points; which point is closer?

Objects stand on a flat ground seen from a camera above it, so farther objects sit higher (toward the horizon) and
are drawn smaller, and nearer ones are painted over them (painter's order). Points A and B lie on objects or on the
ground, at depths at least 25% apart. The helper image is the rendered depth map (grayscale, near = bright), saved
as a PNG that the perception-token method can tokenize; ``meta.depth_encoding`` says how to read depth back from it.

    vlatent build-data depth --out data/depth --n 1000 --objects 3-6
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from . import common

VERSION = 2  # 2: meta.text_cot compares where A and B stand in the picture (was: their depths as numbers)
SIDE, HORIZON = 160, 56  # image side and horizon row, in pixels
NEAR, FAR = 1.5, 40.0  # depth of the bottom image row and of the sky, in camera heights
K = NEAR * (SIDE - 1 - HORIZON)  # ground depth at row y is K / (y - HORIZON)
COLORS = {"red": (215, 50, 50), "green": (50, 160, 70), "blue": (50, 90, 220), "yellow": (235, 200, 40),
          "purple": (150, 70, 190), "orange": (240, 140, 40)}
KINDS = ("box", "ball", "cone")
ENCODING = "gray = round(255 * (1/depth - 1/far) / (1/near - 1/far)); depth in camera heights, sky = far"


@dataclass(frozen=True)
class Thing:
    color: str
    kind: str
    depth: float
    x: int  # centre column of its base
    aspect: float  # width / height

    def box(self) -> tuple[int, int, int, int]:
        height = 110 / self.depth
        base = HORIZON + K / self.depth
        return (round(self.x - height * self.aspect / 2), round(base - height),
                round(self.x + height * self.aspect / 2), round(base))


@dataclass
class Scene:
    things: tuple[Thing, ...]  # far to near: the painting order
    points: tuple[tuple[int, int], tuple[int, int]]  # A, B as (x, y)
    answer: str

    @property
    def key(self):
        return self.things, self.points


def gray(depth: float) -> int:
    return round(255 * (1 / depth - 1 / FAR) / (1 / NEAR - 1 / FAR))


def paint(things, scene: Image.Image, depth: Image.Image, ids: Image.Image) -> None:
    """Draw the ground and the objects far to near into the scene, the depth map and an object-id map (0 = ground)."""
    ds, dd, di = ImageDraw.Draw(scene), ImageDraw.Draw(depth), ImageDraw.Draw(ids)
    ds.rectangle([0, 0, SIDE, HORIZON], fill=(185, 215, 245))
    dd.rectangle([0, 0, SIDE, HORIZON], fill=gray(FAR))
    for y in range(HORIZON + 1, SIDE):
        shade = 0.55 + 0.45 * (y - HORIZON) / (SIDE - HORIZON)
        ds.line([0, y, SIDE, y], fill=tuple(round(v * shade) for v in (200, 185, 150)))
        dd.line([0, y, SIDE, y], fill=gray(min(FAR, K / (y - HORIZON))))
    for i, t in enumerate(things, start=1):
        x0, y0, x1, y1 = t.box()
        for draw, fill, outline in ((ds, COLORS[t.color], (30, 30, 30)), (dd, gray(t.depth), None), (di, i, None)):
            if t.kind == "box":
                draw.rectangle([x0, y0, x1, y1], fill=fill, outline=outline)
            elif t.kind == "ball":
                draw.ellipse([x0, y0, x1, y1], fill=fill, outline=outline)
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill, outline=outline)


def depth_at(things, ids: Image.Image, point) -> tuple[float, str]:
    """The depth at a pixel and what is there (an object's name, or the ground)."""
    i = ids.getpixel(point)
    if i:
        return things[i - 1].depth, f"the {things[i - 1].color} {things[i - 1].kind}"
    return K / (point[1] - HORIZON), "the ground"


def grid_cell(x: float, y: float, grid: int = 4) -> tuple[int, int]:
    """(row, column) of a pixel on a ``grid`` x ``grid`` grid laid over the picture."""
    step = SIDE / grid
    return min(grid - 1, int(y // step)), min(grid - 1, int(x // step))


def random_things(rng, objects: tuple[int, int]) -> tuple[Thing, ...]:
    """Between ``objects[0]`` and ``objects[1]`` objects of different colour and kind, far to near."""
    kinds = rng.sample([(c, k) for c in COLORS for k in KINDS], rng.randint(*objects))
    return tuple(sorted((Thing(c, k, round(rng.uniform(2.0, 12.0), 2), rng.randrange(15, SIDE - 15),
                               round(rng.uniform(0.6, 1.4), 2)) for c, k in kinds), key=lambda t: -t.depth))


def draw_scene(things) -> tuple[Image.Image, Image.Image]:
    """The painted scene and its object-id map (0 = ground)."""
    image, depth, ids = Image.new("RGB", (SIDE, SIDE)), Image.new("L", (SIDE, SIDE)), Image.new("L", (SIDE, SIDE))
    paint(things, image, depth, ids)
    return image, ids


def mark(image: Image.Image, points, size: int = 0) -> None:
    """Draw the points A, B, ... as white dots with a black label tag, or (``size`` > 0) as discs of that diameter
    centred on the points, A white and B black with the letter inside, large enough for a coarse vision grid."""
    d = ImageDraw.Draw(image)
    if size:
        font, r = ImageFont.load_default(max(8, size * 2 // 3)), size // 2
        for (label, fill, ink), (x, y) in zip((("A", "white", "black"), ("B", "black", "white")), points):
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=ink, width=max(1, size // 10))
            d.text((x, y), label, fill=ink, font=font, anchor="mm")
        return
    font = ImageFont.load_default(11)
    for label, (x, y) in zip("AB", points):
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 255, 255), outline=(0, 0, 0))
        tx, ty = min(x + 5, SIDE - 12), max(y - 16, 0)
        d.rectangle([tx, ty, tx + 10, ty + 12], fill=(0, 0, 0))
        d.text((tx + 5, ty + 6), label, fill=(255, 255, 255), font=font, anchor="mm")


def sample(rng, target, objects: tuple[int, int]) -> Scene | None:
    """A scene whose point ``target[1]`` is the closer one."""
    things = random_things(rng, objects)
    _, ids = draw_scene(things)
    on_objects = [(x, y) for x in range(6, SIDE - 6, 3) for y in range(6, SIDE - 6, 3) if ids.getpixel((x, y))]
    on_ground = [(x, y) for x in range(6, SIDE - 6, 5) for y in range(HORIZON + 6, SIDE - 6, 5)
                 if not ids.getpixel((x, y))]
    if not on_objects or not on_ground:
        return None
    p = rng.choice(on_objects)
    q = rng.choice(on_objects if rng.random() < 0.7 else on_ground)
    (dp, _), (dq, _) = depth_at(things, ids, p), depth_at(things, ids, q)
    if max(dp, dq) < 1.25 * min(dp, dq) or abs(p[0] - q[0]) + abs(p[1] - q[1]) < 24:
        return None
    near, far = (p, q) if dp < dq else (q, p)
    return Scene(things, (near, far) if target[1] == "A" else (far, near), target[1])


def render(s: Scene, rid: str, writer: common.DatasetWriter, marker: int = 0) -> dict:
    scene, depth, ids = Image.new("RGB", (SIDE, SIDE)), Image.new("L", (SIDE, SIDE)), Image.new("L", (SIDE, SIDE))
    paint(s.things, scene, depth, ids)
    facts = [depth_at(s.things, ids, p) for p in s.points]
    mark(scene, s.points, marker)
    images = [writer.save(scene, rid), writer.save(depth, f"{rid}-depth")]
    other = "B" if s.answer == "A" else "A"
    # the rule, then the one judgement it needs, made on the picture: whose footing is lower (an object's base, or a
    # ground point itself), which orders depth exactly on a flat ground. Depths as numbers, or where each point is
    # and what it is on, are more than the tiny base reads off these pictures (0.50 and 0.58 with 4x the small budget)
    cot = ("On a flat ground, what stands lower in the picture is nearer: an object by its base, the ground by the "
           f"point itself. Point {s.answer} stands lower than point {other}, so point {s.answer} is closer to the "
           f"camera than point {other}.")
    steps = ["Let me estimate the depth map of the scene.", 1,
             f"In the depth map point {s.answer} is brighter than point {other}, so it is closer to the camera."]
    meta = {"question_type": "closer_point", "points": {"A": list(s.points[0]), "B": list(s.points[1])},
            "depths": {"A": round(facts[0][0], 3), "B": round(facts[1][0], 3)}, "depth_map": images[1],
            "depth_encoding": ENCODING, "near": NEAR, "far": FAR, "text_cot": f"{cot} The answer is {s.answer}."}
    question = "Two points in the image are marked A and B. Which point is closer to the camera? Answer A or B."
    return common.make_record(rid, "depth", images, [0, question], steps, s.answer, meta)


def parser():
    p = common.synthetic_parser("depth", __doc__)
    p.add_argument("--objects", type=common.int_range(1, 10), default="3-6", metavar="N|MIN-MAX",
                   help="objects per scene")
    p.add_argument("--marker", type=int, choices=range(0, 41), default=0, metavar="PX",
                   help="draw A and B as discs PX wide (A white, B black) instead of dots with label tags (0)")
    return p


def build(args) -> None:
    targets = [("closer_point", "A"), ("closer_point", "B")]
    common.synthesize(args, "depth", VERSION, targets, lambda rng, t: sample(rng, t, args.objects),
                      lambda sc, rid, writer: render(sc, rid, writer, args.marker))


def main(argv: list[str] | None = None) -> int:
    return common.run(parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
