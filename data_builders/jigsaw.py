"""Jigsaw: a picture cut into tiles with one missing; which of four candidate tiles fills the gap?

The picture is drawn procedurally (a colour gradient under random shapes, ``--shapes``) and cut into a grid of tiles
(2x2 by default). The question shows the picture with a hole and four candidates A-D: the right tile, the right tile
turned or mirrored, and the tiles from the same place in two other pictures (``--distractors foreign``: three other
pictures, no turned tile). The candidates come on one board image (``--layout board``, the default) or one image each,
each after its letter (``--layout separate``: every tile at its own resolution, which a model with few tokens per image
can compare with the hole's neighbours; ``--layout inplace``: each a copy of the picture with that candidate in the gap,
so whether it fits is read off one image). A puzzle is kept only when the right tile also continues the neighbouring
edges best, which is what the text chain of thought checks. The helper image is the completed picture.
``--question fits`` asks instead about one picture with one candidate pasted into the gap: does it fit (yes / no)?

    vlatent build-data jigsaw --out data/jigsaw --n 1000 --grid 2
    vlatent build-data jigsaw --out data/jigsaw --n 1000 --grid 2 --layout separate --distractors foreign
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFont, ImageStat

from . import common

VERSION = 1
SIDE = 144  # picture side in pixels, divisible by every grid
TURNS = {"turned upside down": Image.Transpose.ROTATE_180, "mirrored left to right": Image.Transpose.FLIP_LEFT_RIGHT,
         "mirrored top to bottom": Image.Transpose.FLIP_TOP_BOTTOM}
MIN_GAP = 12.0  # mean absolute pixel difference that tells two tiles, or a good and a bad edge, apart


@dataclass
class Puzzle:
    grid: int
    seeds: tuple[int, ...]  # the picture, then the pictures the foreign candidates come from (two, or three)
    missing: int  # tile index, row-major
    turn: str  # how the turned candidate is turned (with two foreign candidates)
    order: tuple[int, ...]  # candidates A-D: 0 right, 1 turned (or a third foreign tile), 2 and 3 foreign
    answer: str
    shapes: tuple[int, int] = (6, 10)  # how many shapes each picture has, at least and at most
    shown: int = -1  # --question fits: the candidate (index A-D) pasted into the gap; -1: the four-candidate question

    @property
    def key(self):
        return self.grid, self.seeds, self.missing, self.turn, self.order


def paint(seed: int, shapes: tuple[int, int] = (6, 10)) -> Image.Image:
    """A picture: a two-colour gradient under ``shapes`` (at least, at most) random ellipses, rectangles, triangles
    and bars."""
    rng = random.Random(seed)

    def color():
        return tuple(rng.randrange(256) for _ in range(3))

    im = Image.new("RGB", (SIDE, SIDE))
    d = ImageDraw.Draw(im)
    a, b = color(), color()
    horizontal = rng.random() < 0.5
    for i in range(SIDE):
        mix = tuple(round(x + (y - x) * i / (SIDE - 1)) for x, y in zip(a, b))
        d.line([0, i, SIDE, i] if horizontal else [i, 0, i, SIDE], fill=mix)
    for _ in range(rng.randint(*shapes)):
        x, y = rng.randrange(-20, SIDE), rng.randrange(-20, SIDE)
        w, h = rng.randint(20, 80), rng.randint(20, 80)
        kind = rng.choice(("ellipse", "rectangle", "triangle", "bar"))
        if kind == "ellipse":
            d.ellipse([x, y, x + w, y + h], fill=color(), outline=color(), width=2)
        elif kind == "rectangle":
            d.rectangle([x, y, x + w, y + h], fill=color())
        elif kind == "triangle":
            d.polygon([(x, y + h), (x + w, y + h), (x + rng.randint(0, w), y)], fill=color())
        else:
            d.line([x, y, x + w, y + h], fill=color(), width=rng.randint(4, 12))
    return im


def tile_box(grid: int, idx: int) -> tuple[int, int, int, int]:
    t = SIDE // grid
    r, c = divmod(idx, grid)
    return c * t, r * t, (c + 1) * t, (r + 1) * t


def gap(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two same-size images, 0-255."""
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def side_gaps(picture: Image.Image, grid: int, idx: int, tile: Image.Image) -> dict[str, float]:
    """How badly ``tile`` continues the picture around tile ``idx``, per side that has a neighbour: the mean
    difference between its border row or column there and the pixels just outside the hole."""
    x0, y0, x1, y1 = tile_box(grid, idx)
    t = x1 - x0
    pairs = {}
    if y0 > 0:
        pairs["top"] = tile.crop((0, 0, t, 1)), picture.crop((x0, y0 - 1, x1, y0))
    if y1 < SIDE:
        pairs["bottom"] = tile.crop((0, t - 1, t, t)), picture.crop((x0, y1, x1, y1 + 1))
    if x0 > 0:
        pairs["left"] = tile.crop((0, 0, 1, t)), picture.crop((x0 - 1, y0, x0, y1))
    if x1 < SIDE:
        pairs["right"] = tile.crop((t - 1, 0, t, t)), picture.crop((x1, y0, x1 + 1, y1))
    return {side: gap(a, b) for side, (a, b) in pairs.items()}


def edge_gaps(picture: Image.Image, grid: int, idx: int, tile: Image.Image) -> float:
    """``side_gaps`` averaged over the sides."""
    sides = side_gaps(picture, grid, idx, tile)
    return sum(sides.values()) / len(sides)


def make(p: Puzzle) -> tuple[Image.Image, list[Image.Image]]:
    """The picture and the candidate tiles in the order A-D."""
    picture = paint(p.seeds[0], p.shapes)
    box = tile_box(p.grid, p.missing)
    right = picture.crop(box)
    second = right.transpose(TURNS[p.turn]) if len(p.seeds) == 3 else paint(p.seeds[3], p.shapes).crop(box)
    tiles = [right, second, paint(p.seeds[1], p.shapes).crop(box), paint(p.seeds[2], p.shapes).crop(box)]
    return picture, [tiles[i] for i in p.order]


def sample(rng, target, grid: int, foreign: bool = False, shapes: tuple[int, int] = (6, 10)) -> Puzzle | None:
    """A puzzle with the right tile at letter ``target[1]`` (a fits target: at a random letter, the shown candidate
    chosen by the yes / no) whose candidates differ clearly from each other and whose right tile continues the
    neighbouring edges clearly best; ``foreign``: no turned candidate, three foreign ones."""
    order = [1, 2, 3]
    rng.shuffle(order)
    fits = target[0] == "fits"
    right = rng.randrange(4) if fits else common.LETTERS.index(target[1])
    order.insert(right, 0)
    p = Puzzle(grid, tuple(rng.getrandbits(32) for _ in range(4 if foreign else 3)), rng.randrange(grid * grid),
               rng.choice(list(TURNS)), tuple(order), target[1], shapes)
    if fits:  # a yes shows the right tile, a no one of the other three
        p.shown = right if target[1] == "yes" else rng.choice([i for i in range(4) if i != right])
    picture, tiles = make(p)
    if min(gap(a, b) for i, a in enumerate(tiles) for b in tiles[i + 1:]) < MIN_GAP:
        return None
    edges = sorted(edge_gaps(picture, grid, p.missing, t) for t in tiles)
    best = edge_gaps(picture, grid, p.missing, tiles[order.index(0)])
    return p if best == edges[0] and edges[1] - best >= MIN_GAP else None


def cut_hole(picture: Image.Image, grid: int, missing: int) -> None:
    """Grey out tile ``missing`` with a question mark on it."""
    d = ImageDraw.Draw(picture)
    box = tile_box(grid, missing)
    d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(200, 200, 200), outline=(90, 90, 90))
    font = ImageFont.load_default(max(12, SIDE // grid // 2))
    d.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "?", fill=(90, 90, 90), font=font, anchor="mm")


def board_of(tiles: list[Image.Image]) -> Image.Image:
    """The four candidate tiles on one white board, 2x2, each under its letter."""
    t = tiles[0].width
    pad, label = 8, 16
    board = Image.new("RGB", (2 * t + 3 * pad, 2 * (t + label) + 3 * pad), (255, 255, 255))
    d = ImageDraw.Draw(board)
    small = ImageFont.load_default(13)
    for i, tile in enumerate(tiles):
        x, y = pad + (i % 2) * (t + pad), pad + (i // 2) * (t + label + pad)
        d.text((x + t / 2, y + label / 2), common.LETTERS[i], fill=(0, 0, 0), font=small, anchor="mm")
        board.paste(tile, (x, y + label))
        d.rectangle([x - 1, y + label - 1, x + t, y + label + t], outline=(90, 90, 90))
    return board


def filled(holed: Image.Image, p: Puzzle, tile: Image.Image) -> Image.Image:
    """The holed picture with ``tile`` pasted into its gap (``--layout inplace``: one picture per candidate)."""
    out = holed.copy()
    out.paste(tile, tile_box(p.grid, p.missing)[:2])
    return out


def render(p: Puzzle, rid: str, writer: common.DatasetWriter, layout: str = "board") -> dict:
    picture, tiles = make(p)
    holed = picture.copy()
    cut_hole(holed, p.grid, p.missing)
    if p.shown >= 0:
        return render_fits(p, rid, writer, picture, holed, tiles)
    images = [writer.save(holed, rid)]
    options = [f"candidate tile {common.LETTERS[i]}" for i in range(4)]
    stem = "The first image is a picture with one tile missing (the grey square with a question mark)."
    if layout == "board":
        images.append(writer.save(board_of(tiles), f"{rid}-candidates"))
        user = [0, 1, common.multiple_choice(f"{stem} The second image shows four candidate tiles. Which candidate "
                                             "fills the gap?", options)]
    else:  # each candidate's image right after its letter, so the letter sits next to the tile it names
        shown = tiles if layout == "separate" else [filled(holed, p, tile) for tile in tiles]
        images += [writer.save(im, f"{rid}-{common.LETTERS[i]}") for i, im in enumerate(shown)]
        user = [0, f"{stem} Which candidate tile fills the gap?" if layout == "separate" else
                f"{stem} Each of the next four images fills the gap with one candidate tile. Which candidate fits?"]
        for i in range(4):
            user += [f"{common.LETTERS[i]}.", i + 1]
    images.append(writer.save(picture, f"{rid}-full"))
    r, c = divmod(p.missing, p.grid)
    scores = [edge_gaps(picture, p.grid, p.missing, tile) for tile in tiles]
    others = ("the other three come from different pictures" if len(p.seeds) == 4 else
              f"candidate {common.LETTERS[p.order.index(1)]} is the same tile {p.turn}, and the other two come from "
              "different pictures")
    cot = (f"The missing tile is at row {r + 1}, column {c + 1} of the {p.grid}x{p.grid} grid. The right tile must "
           f"continue the colours and shapes across every edge it shares with its neighbours. Comparing each "
           f"candidate's border with the pixels next to the gap (mean difference on a 0-255 scale): "
           + ", ".join(f"{common.LETTERS[i]} {s:.0f}" for i, s in enumerate(scores))
           + f". Candidate {p.answer} matches best; {others}.")
    steps = ["Let me picture the completed image with the best-fitting candidate in the gap.", len(images) - 1,
             f"With candidate {p.answer} in place, colours and shapes continue across every edge."]
    meta = {"question_type": "missing_tile", "grid": p.grid, "missing": [r, c], "options": options,
            "text_cot": f"{cot} The answer is {p.answer}."}
    return common.make_record(rid, "jigsaw", images, user, steps, p.answer, meta)


def render_fits(p: Puzzle, rid: str, writer: common.DatasetWriter, picture: Image.Image, holed: Image.Image,
                tiles: list[Image.Image]) -> dict:
    """``--question fits``: one picture with one candidate pasted into its gap; does it fit (yes / no)?"""
    images = [writer.save(filled(holed, p, tiles[p.shown]), rid), writer.save(picture, f"{rid}-full")]
    r, c = divmod(p.missing, p.grid)
    kind = p.order[p.shown]  # 0 right, 1 turned (or foreign), 2 and 3 foreign
    what = ("it is the missing tile itself" if kind == 0 else
            f"it is the missing tile {p.turn}" if kind == 1 and len(p.seeds) == 3 else
            "it comes from a different picture")
    sides = side_gaps(picture, p.grid, p.missing, tiles[p.shown])
    question = (f"A tile of this picture was cut out and a candidate tile pasted in its place (row {r + 1}, column "
                f"{c + 1} of the {p.grid}x{p.grid} grid). Does the candidate fit? Answer yes or no.")
    # each edge in words, not as a number: a trace a model can read off the picture (1.5 x MIN_GAP: the widest
    # border change of a right tile in plain pictures is under it, most foreign tiles' edges far above)
    edges = "; ".join(f"its {side} edge " + ("continues the picture" if g < 1.5 * MIN_GAP else "breaks off")
                      for side, g in sides.items())
    cot = (f"The pasted tile is at row {r + 1}, column {c + 1}. A tile that fits continues the colours and shapes "
           f"across every edge it shares with its neighbours: {edges}. So it "
           + ("fits" if p.answer == "yes" else "does not fit") + f": {what}.")
    steps = ["Let me picture the completed image with the right tile in the gap.", 1,
             "The pasted tile " + ("matches it." if p.answer == "yes" else "differs from it.")]
    meta = {"question_type": "fits", "grid": p.grid, "missing": [r, c],
            "candidate": ["right", "turned" if len(p.seeds) == 3 else "foreign", "foreign", "foreign"][kind],
            "text_cot": f"{cot} The answer is {p.answer}."}
    return common.make_record(rid, "jigsaw", images, [0, question], steps, p.answer, meta)


def parser():
    p = common.synthetic_parser("jigsaw", __doc__)
    p.add_argument("--grid", type=int, choices=(2, 3, 4), default=2, help="tiles per side")
    p.add_argument("--question", choices=("candidates", "fits"), default="candidates",
                   help="candidates: which of four tiles fills the gap (A-D); fits: one candidate pasted into the gap, "
                        "does it fit (yes / no; --layout does not apply)")
    p.add_argument("--layout", choices=("board", "separate", "inplace"), default="board",
                   help="the four candidates on one board image, one image each, or each pasted into the gap of a "
                        "copy of the picture")
    p.add_argument("--distractors", choices=("mixed", "foreign"), default="mixed",
                   help="mixed: the right tile turned or mirrored and two tiles of other pictures; foreign: three "
                        "tiles of other pictures")
    p.add_argument("--shapes", type=common.int_range(0, 20), default="6-10", metavar="N|MIN-MAX",
                   help="shapes drawn over each picture's gradient (fewer: the tiles' colours tell more)")
    return p


def build(args) -> None:
    targets = ([("missing_tile", letter) for letter in common.LETTERS[:4]] if args.question == "candidates" else
               [("fits", "yes"), ("fits", "no")])
    common.synthesize(args, "jigsaw", VERSION, targets,
                      lambda rng, t: sample(rng, t, args.grid, args.distractors == "foreign", args.shapes),
                      lambda p, rid, writer: render(p, rid, writer, args.layout))


def main(argv: list[str] | None = None) -> int:
    return common.run(parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
