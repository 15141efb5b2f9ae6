"""Perception captions of the synthetic tasks' pictures: read a maze or a frozen-lake map back cell by cell, say where
the marked points and the objects of a depth scene are, where a jigsaw's gap is; with the opt-in route kinds, which
cells a line drawn on a maze or a lake goes through (what the tasks' helper images add to their question pictures).

The pretraining data of the tiny base that sees (`vlatent pretrain-base`): pictures drawn by the task builders' own
drawing code, captions that only say what is there. Never a task question, never a helper image, and never a picture
a task builder can draw: mazes are random wall grids that are not perfect mazes (nor a perfect maze with one passage
walled off), frozen-lake maps have a hole count the vsp builder never draws, depth and jigsaw pictures are
continuous draws. ``meta`` keeps what the caption says, so a model's reading can be scored cell by cell (`score`).

    vlatent build-data captions --out data/captions --n 20000 --kinds maze,vsp,depth,jigsaw
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw

from . import common, depth, jigsaw, maze, vsp

VERSION = 1
KINDS = ("maze", "vsp", "depth", "jigsaw", "maze_route", "lake_route")
DEFAULT_KINDS = KINDS[:4]  # the shipped base's captions; the route kinds are opt-in
SIDES = ("up", "down", "left", "right")  # a maze cell's open sides, in this order
SYMBOLS = {vsp.START: "S", vsp.GOAL: "G", vsp.HOLE: "H", vsp.ICE: "F"}  # FrozenLake's letters
SHARE = {"maze": 3}  # examples per cycle of the kinds: thin maze walls are the slowest thing to learn to see
GRID = 4  # depth scenes are described on a GRID x GRID grid of the picture
PROMPTS = {
    "maze": "Read the maze: where are the start and the goal, and which sides of each cell are open?",
    "vsp": "Read the frozen lake row by row: S start, G goal, H hole, F ice.",
    "depth": f"List the objects and the marked points, with their row and column on a {GRID}x{GRID} grid.",
    "jigsaw": "Where is the missing tile?",
    "maze_route": "Which cells does the drawn route cover?",
    "lake_route": "Which cells does the drawn route cover? Does it leave the grid or end with a cross?",
}


@dataclass
class Picture:
    kind: str
    data: tuple  # what the picture is drawn from (also its identity)

    @property
    def key(self):
        return self.kind, self.data


def wall_grid(rng, size: int) -> list[int] | None:
    """Open sides per cell, each passage open with one probability; None for a perfect maze or a perfect maze with
    one passage walled off (what the maze builder draws): an acyclic grid in at most two pieces."""
    p = rng.uniform(0.45, 0.8)
    cells = [0] * (size * size)
    parent = list(range(size * size))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    cyclic = False
    for idx in range(size * size):
        r, c = divmod(idx, size)
        for d, nxt, ok in (("right", idx + 1, c + 1 < size), ("down", idx + size, r + 1 < size)):
            if ok and rng.random() < p:
                cells[idx] |= maze.BIT[d]
                cells[nxt] |= maze.BIT[maze.OPPOSITE[d]]
                a, b = find(idx), find(nxt)
                cyclic |= a == b
                parent[a] = b
    pieces = len({find(i) for i in range(size * size)})
    return None if not cyclic and pieces <= 2 else cells


def lake(rng, size: int) -> list[list[int]] | None:
    """A frozen-lake map whose hole count the vsp builder never draws (it draws round(u * size^2) holes, u in
    [0.15, 0.35])."""
    drawn = set(range(round(0.15 * size * size), round(0.35 * size * size) + 1))
    counts = [k for k in range(size * size - 1) if k not in drawn and k <= size * size // 2]
    cells = [(r, c) for r in range(size) for c in range(size)]
    start, goal = rng.sample(cells, 2)
    holes = set(rng.sample([x for x in cells if x not in (start, goal)], rng.choice(counts)))
    return [[vsp.START if (r, c) == start else vsp.GOAL if (r, c) == goal else vsp.HOLE if (r, c) in holes
             else vsp.ICE for c in range(size)] for r in range(size)]


def sample(rng, target, sizes: tuple[int, int], walls: tuple[int, int]) -> Picture | None:
    kind = target[0]
    if kind == "maze":
        size = rng.randint(*sizes)
        cells = wall_grid(rng, size)
        if cells is None:
            return None
        start, goal = rng.sample(range(size * size), 2)
        return Picture(kind, (size, tuple(cells), start, goal, rng.randint(*walls)))
    if kind == "vsp":
        return Picture(kind, tuple(map(tuple, lake(rng, rng.randint(*sizes)))))
    if kind == "depth":
        things = depth.random_things(rng, (1, 6))
        points = tuple((rng.randrange(6, depth.SIDE - 6), rng.randrange(6, depth.SIDE - 6)) for _ in range(2))
        return Picture(kind, (things, points))
    if kind == "maze_route":
        size = rng.randint(*sizes)
        cells = wall_grid(rng, size)
        if cells is None:
            return None
        path = open_walk(rng, cells, size, rng.randint(2, size * size // 2))
        return Picture(kind, (size, tuple(cells), tuple(path), rng.randint(*walls))) if len(path) > 1 else None
    if kind == "lake_route":
        cells = lake(rng, rng.randint(*sizes))
        return Picture(kind, (tuple(map(tuple, cells)), tuple(vsp.walk_sequence(rng, cells, rng.randint(1, 5)))))
    grid = rng.choice((2, 3))
    return Picture(kind, (grid, rng.getrandbits(32), rng.randrange(grid * grid)))


def open_walk(rng, cells: list[int], size: int, length: int) -> list[int]:
    """A walk through open passages from a random cell that never revisits one: up to ``length`` cells."""
    path = [rng.randrange(size * size)]
    while len(path) < length:
        r, c = divmod(path[-1], size)
        nxt = [(r + dr) * size + c + dc for d, (dr, dc) in maze.MOVES.items() if cells[path[-1]] & maze.BIT[d]]
        nxt = [x for x in nxt if x not in path]
        if not nxt:
            break
        path.append(rng.choice(nxt))
    return path


def route_caption(points: list[tuple[int, int]], size: int, failed: bool = False) -> str:
    """The cells a drawn route covers, in reading order (a line drawn over itself shows no order), and whether it
    leaves the grid or ends with a cross."""
    inside = sorted({(r, c) for r, c in points if 0 <= r < size and 0 <= c < size})
    return ("The drawn route covers " + "; ".join(common.cell_name(r, c) for r, c in inside) + "."
            + (" It leaves the grid." if len(inside) < len(set(points)) else "")
            + (" It ends with a cross." if failed else ""))


def surface(things, ids: Image.Image, point) -> str:
    """What a depth scene's pixel shows: an object, the ground or the sky."""
    if ids.getpixel(point):
        return depth.depth_at(things, ids, point)[1]
    return "the sky" if point[1] <= depth.HORIZON else "the ground"


def draw(p: Picture) -> tuple[Image.Image, str, dict]:
    """The picture (drawn by its task builder's code), its caption, and what the caption says as data."""
    if p.kind == "maze":
        size, cells, start, goal, wall = p.data
        image, _, _ = maze.draw(maze.Maze(size, list(cells), start, goal, "", "", ""), wall)
        rows = ["; ".join(" ".join(s for s in SIDES if cell & maze.BIT[s]) or "closed"
                          for cell in cells[r * size:(r + 1) * size]) for r in range(size)]
        caption = (f"The start is at {common.cell_name(*divmod(start, size))}. "
                   f"The goal is at {common.cell_name(*divmod(goal, size))}. "
                   + " ".join(f"Row {r + 1}: {row}." for r, row in enumerate(rows)))
        return image, caption, {"size": size, "cells": list(cells), "start": start, "goal": goal}
    if p.kind == "vsp":
        image, _ = vsp.draw([list(row) for row in p.data], [])
        rows = [" ".join(SYMBOLS[v] for v in row) for row in p.data]
        caption = " ".join(f"Row {r + 1}: {row}." for r, row in enumerate(rows))
        return image, caption, {"rows": rows}
    if p.kind == "depth":
        things, points = p.data
        image, ids = depth.draw_scene(things)
        depth.mark(image, points)
        objects = [f"{'an' if t.color[0] in 'aeiou' else 'a'} {t.color} {t.kind} at "
                   f"{common.cell_name(*depth.grid_cell(t.x, t.box()[3], GRID))}"
                   for t in sorted(things, key=lambda t: t.x)]
        where = {label: (surface(things, ids, pt), depth.grid_cell(*pt, GRID)) for label, pt in zip("AB", points)}
        caption = (f"Objects, left to right: {', '.join(objects)}. "
                   + " ".join(f"Point {label} is on {what} at {common.cell_name(*rc)}."
                              for label, (what, rc) in where.items()))
        return image, caption, {"points": {k: [w, list(rc)] for k, (w, rc) in where.items()}}
    if p.kind == "maze_route":
        size, cells, path, wall = p.data
        image, cell, pad = maze.draw(maze.Maze(size, list(cells), path[0], path[-1], "", "", ""), wall)
        points = [divmod(x, size) for x in path]
        ImageDraw.Draw(image).line([maze.center(r, c, cell, pad) for r, c in points], fill=maze.ROUTE,
                                   width=max(3, cell // 5))
        return image, route_caption(points, size), {"size": size, "cells": list(cells),
                                                    "route": [list(x) for x in points]}
    if p.kind == "lake_route":
        cells, actions = p.data
        _, image = vsp.draw([list(row) for row in cells], list(actions))
        points = [vsp.find(cells, vsp.START)]
        for a in actions:  # as vsp.draw walks it: up to the first hole, goal or step off the grid
            (r, c), (dr, dc) = points[-1], vsp.ACTIONS[a]
            points.append((r + dr, c + dc))
            if not (0 <= r + dr < len(cells) and 0 <= c + dc < len(cells)) or cells[r + dr][c + dc] in (vsp.HOLE,
                                                                                                         vsp.GOAL):
                break
        failed = vsp.simulate([list(row) for row in cells], list(actions)) in ("hole", "off-grid")
        rows = [" ".join(SYMBOLS[v] for v in row) for row in cells]
        return image, route_caption(points, len(cells), failed), {"rows": rows, "route": [list(x) for x in points]}
    grid, seed, missing = p.data
    picture = jigsaw.paint(seed)
    jigsaw.cut_hole(picture, grid, missing)
    r, c = divmod(missing, grid)
    return picture, f"The missing tile is at {common.cell_name(r, c)} of the {grid}x{grid} grid.", {"missing": [r, c]}


def render(p: Picture, rid: str, writer: common.DatasetWriter) -> dict:
    image, caption, facts = draw(p)
    return {"id": rid, "images": [writer.save(image, rid)], "task": "captions", "answer": caption,
            "messages": [{"role": "user", "content": common.content([0, PROMPTS[p.kind]], "image")},
                         {"role": "assistant", "content": [{"type": "text", "text": caption}]}],
            "meta": {"kind": p.kind, **facts}}


def score(record: dict, text: str) -> tuple[int, int]:
    """(cells read right, cells) of a model's ``text`` against the record's caption: maze cells (open sides) plus start
    and goal, lake cells, depth points (what they are on and where), the jigsaw gap."""
    truth = record["answer"]
    if record["meta"]["kind"].endswith("_route"):  # the cells covered, leaving the grid, the cross
        units = lambda s: (re.findall(r"row \d+, column \d+", s) + ["leaves"] * ("leaves the grid" in s)
                           + ["cross"] * ("cross" in s))
        want, got = units(truth), set(units(text))
        return sum(u in got for u in want), len(want)
    if record["meta"]["kind"] in ("maze", "vsp"):
        units = lambda s: ([m for m in re.findall(r"(?:start|goal) is at row \d+, column \d+", s)]
                           + [(i, j, cell.strip()) for i, row in re.findall(r"Row (\d+): ([^.]*)\.", s)
                              for j, cell in enumerate(row.split(";" if record["meta"]["kind"] == "maze" else " "))])
    else:
        units = lambda s: [x.strip() for x in re.split(r"(?<=\.) ", s)]
    want, got = units(truth), set(units(text))
    return sum(u in got for u in want), len(want)


def parser():
    p = common.synthetic_parser("captions", __doc__)
    p.add_argument("--kinds", type=common.choices_list(KINDS), default=",".join(DEFAULT_KINDS),
                   help="picture kinds, comma-separated (examples cycle through them, mazes 3 times as often); "
                        f"{' and '.join(KINDS[4:])} are opt-in: a line drawn on a maze or lake, and its cells")
    p.add_argument("--size", type=common.int_range(3, 6), default="4", metavar="N|MIN-MAX",
                   help="maze and lake side in cells")
    p.add_argument("--wall", type=common.int_range(1, 8), default="2-8", metavar="PX|MIN-MAX",
                   help="maze wall width in pixels (the maze builder's default is 2)")
    return p


def build(args) -> None:
    targets = [(kind, "") for kind in args.kinds for _ in range(SHARE.get(kind, 1))]
    common.synthesize(args, "captions", VERSION, targets, lambda rng, t: sample(rng, t, args.size, args.wall), render)


def main(argv: list[str] | None = None) -> int:
    return common.run(parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
