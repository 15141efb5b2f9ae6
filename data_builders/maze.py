"""Grid mazes: which way first, how many turns, is the goal reachable, which route, sketched one straight run at a time.

Each maze is a perfect maze (exactly one path between two cells) of 3x3 to 8x8 cells with a start (green) and a goal
(red); for "is the goal reachable?" half of them get one passage on the route walled off. The helper images are the
maze with the route drawn up to the end of each straight run, one latent step per run, as in Latent Sketchpad's maze
planning, each after the sentence that names the run and the cell it ends in (the reasoning of ``meta.text_cot``, so
a latent method and the text baseline read the same words); an unreachable goal gets one sketch that shades every cell the start can reach.

    vlatent build-data maze --out data/maze --n 1000 --size 3-8 --questions first_move,turns,reachable,route_mc

``meta.cells`` keeps the maze (row-major, per cell a bit mask of its open sides: 1 up, 2 down, 4 left, 8 right) so
answers can be recomputed; ``meta.start``/``meta.goal`` are ``[row, column]``, 0-based.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from . import common

VERSION = 2  # 2: the latent trace writes out the cell each run ends in
QUESTIONS = ("first_move", "turns", "reachable", "route_mc")
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
BIT = {"up": 1, "down": 2, "left": 4, "right": 8}
OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}
# Palette: background, wall, start, goal, route, reachable shading.
PALETTE = [255, 255, 255, 30, 30, 30, 60, 170, 70, 215, 50, 50, 40, 100, 230, 190, 215, 250]
WHITE, WALL, START, GOAL, ROUTE, SHADE = range(6)
INTRO = ("In this maze the green square is the start and the red square is the goal. You can move up, down, left or "
         "right between neighbouring cells that are not separated by a wall.")


@dataclass
class Maze:
    size: int
    cells: list[int]  # open sides per cell, row-major
    start: int
    goal: int
    qtype: str
    question: str
    answer: str
    moves: list[str] = field(default_factory=list)  # the route, empty when the goal is unreachable
    options: list[str] = field(default_factory=list)

    @property
    def key(self):
        return self.size, tuple(self.cells), self.start, self.goal, self.question, tuple(self.options)


def carve(rng, size: int) -> list[int]:
    """A perfect maze by randomized depth-first search (long winding corridors, so routes have many turns)."""
    cells = [0] * (size * size)
    stack = [rng.randrange(size * size)]
    visited = {stack[0]}
    while stack:
        r, c = divmod(stack[-1], size)
        options = [(d, (r + dr) * size + c + dc) for d, (dr, dc) in MOVES.items()
                   if 0 <= r + dr < size and 0 <= c + dc < size and (r + dr) * size + c + dc not in visited]
        if not options:
            stack.pop()
            continue
        d, nxt = rng.choice(options)
        cells[stack[-1]] |= BIT[d]
        cells[nxt] |= BIT[OPPOSITE[d]]
        visited.add(nxt)
        stack.append(nxt)
    return cells


def explore(cells: list[int], size: int, start: int) -> dict[int, tuple[int | None, str | None]]:
    """Breadth-first search: for every cell reachable from ``start``, (previous cell, move that entered it)."""
    tree = {start: (None, None)}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        r, c = divmod(cell, size)
        for d, (dr, dc) in MOVES.items():
            nxt = (r + dr) * size + c + dc
            if cells[cell] & BIT[d] and nxt not in tree:
                tree[nxt] = (cell, d)
                queue.append(nxt)
    return tree


def route(tree: dict, goal: int) -> list[str]:
    moves = []
    while tree[goal][0] is not None:
        goal, d = tree[goal]
        moves.append(d)
    return moves[::-1]


def runs(moves: list[str]) -> list[tuple[str, int]]:
    """Maximal straight runs: ``[up, up, left] -> [(up, 2), (left, 1)]``."""
    out = []
    for d in moves:
        if out and out[-1][0] == d:
            out[-1] = (d, out[-1][1] + 1)
        else:
            out.append((d, 1))
    return out


def describe(moves: list[str]) -> str:
    return ", ".join(f"{d} {n}" for d, n in runs(moves))


def walk(cells: list[int], size: int, start: int, moves: list[str]) -> int | None:
    """Where ``moves`` lead from ``start``, or None when one of them runs into a wall."""
    cell = start
    for d in moves:
        if not cells[cell] & BIT[d]:
            return None
        cell += MOVES[d][0] * size + MOVES[d][1]
    return cell


def wrong_routes(rng, cells: list[int], size: int, start: int, goal: int, moves: list[str]) -> list[list[str]]:
    """Three routes that look like the right one (one run longer, shorter, turned, dropped, or two runs swapped) but
    do not lead to the goal."""
    segs = runs(moves)
    found: dict[str, list[str]] = {}
    for _ in range(60):
        s = list(segs)
        k = rng.randrange(len(s))
        edit = rng.choice(("longer", "shorter", "turn", "drop", "swap"))
        if edit == "longer":
            s[k] = (s[k][0], s[k][1] + 1)
        elif edit == "shorter" and s[k][1] > 1:
            s[k] = (s[k][0], s[k][1] - 1)
        elif edit == "turn":
            s[k] = (rng.choice([d for d in MOVES if d not in (s[k][0], OPPOSITE[s[k][0]])]), s[k][1])
        elif edit == "drop" and len(s) > 1:
            del s[k]
        elif edit == "swap" and k + 1 < len(s):
            s[k], s[k + 1] = s[k + 1], s[k]
        else:
            continue
        wrong = [d for d, n in s for _ in range(n)]
        text = describe(wrong)
        if walk(cells, size, start, wrong) != goal and text != describe(moves) and text not in found:
            found[text] = wrong
        if len(found) == 3:
            return list(found.values())
    return []


def targets(args) -> list[tuple[str, str]]:
    answers = {"first_move": list(MOVES), "turns": [str(t) for t in range(args.size[1] + 1)],
               "reachable": ["yes", "no"], "route_mc": list(common.LETTERS[:4])}
    return common.cycle_targets({q: answers[q] for q in args.questions})


def sample(rng, target, size_range) -> Maze | None:
    """A maze whose question ``target[0]`` has the answer ``target[1]``, or None when this draw has none."""
    qtype, answer = target
    size = rng.randint(*size_range)
    cells = carve(rng, size)
    start = rng.randrange(size * size)
    tree = explore(cells, size, start)
    moves_to = {g: route(tree, g) for g in tree if g != start}
    if qtype == "first_move":
        goals = [g for g, m in moves_to.items() if m[0] == answer and len(m) >= size - 1]
    elif qtype == "turns":
        goals = [g for g, m in moves_to.items() if len(runs(m)) - 1 == int(answer) and len(m) >= 2]
    else:
        goals = [g for g, m in moves_to.items() if len(m) >= size - 1]
    if not goals:
        return None
    goal = rng.choice(goals)
    moves = moves_to[goal]
    if qtype == "reachable" and answer == "no":  # wall off one passage on the route: the maze falls in two
        k = rng.randrange(len(moves))
        cell = walk(cells, size, start, moves[:k])
        cells[cell] &= ~BIT[moves[k]]
        cells[cell + MOVES[moves[k]][0] * size + MOVES[moves[k]][1]] &= ~BIT[OPPOSITE[moves[k]]]
        moves = []
    options = []
    if qtype == "route_mc":
        wrong = wrong_routes(rng, cells, size, start, goal, moves)
        if not wrong:
            return None
        wrong.insert(common.LETTERS.index(answer), moves)
        options = [describe(m) for m in wrong]
    question = {"first_move": "What is the first move from the start toward the goal? Answer up, down, left or right.",
                "turns": "How many times does the route from the start to the goal change direction? "
                         "Answer with a number.",
                "reachable": "Can the goal be reached from the start? Answer yes or no.",
                "route_mc": "Which sequence of moves leads from the start to the goal?"}[qtype]
    question = common.multiple_choice(f"{INTRO} {question}", options) if options else f"{INTRO} {question}"
    return Maze(size, cells, start, goal, qtype, question, answer, moves, options)


def center(r: int, c: int, cell: int, pad: int) -> tuple[int, int]:
    return pad + c * cell + cell // 2, pad + r * cell + cell // 2


def draw(m: Maze, wall: int = 2) -> tuple[Image.Image, int, int]:
    """The maze image (walls ``wall`` pixels wide), its cell size in pixels and margin."""
    cell = 160 // m.size
    pad = 8
    side = cell * m.size + 2 * pad
    im = Image.new("P", (side, side), WHITE)
    im.putpalette(PALETTE)
    d = ImageDraw.Draw(im)
    inset = max(3, cell // 6)
    for idx, color in ((m.start, START), (m.goal, GOAL)):
        r, c = divmod(idx, m.size)
        d.rectangle([pad + c * cell + inset, pad + r * cell + inset,
                     pad + (c + 1) * cell - inset, pad + (r + 1) * cell - inset], fill=color)
    for idx, sides in enumerate(m.cells):
        r, c = divmod(idx, m.size)
        x, y = pad + c * cell, pad + r * cell
        if not sides & BIT["up"]:
            d.line([x, y, x + cell, y], fill=WALL, width=wall)
        if not sides & BIT["left"]:
            d.line([x, y, x, y + cell], fill=WALL, width=wall)
    d.line([pad, side - pad, side - pad, side - pad, side - pad, pad], fill=WALL, width=wall)
    return im, cell, pad


def render(m: Maze, rid: str, writer: common.DatasetWriter, wall: int = 2) -> dict:
    base, cell, pad = draw(m, wall)
    images = [writer.save(base, rid)]
    rs, cs = divmod(m.start, m.size)
    rg, cg = divmod(m.goal, m.size)
    qtype = m.qtype
    if m.moves:
        cot = [f"Start at {common.cell_name(rs, cs)}."]
        # the latent trace says in words what the text CoT says (where each run ends), the sketch after each run
        steps = ["I'll trace the route from the start one straight run at a time.", cot[0]]
        sketch = base.copy()
        d = ImageDraw.Draw(sketch)
        r, c = rs, cs
        for j, (direction, n) in enumerate(runs(m.moves), start=1):
            r2, c2 = r + MOVES[direction][0] * n, c + MOVES[direction][1] * n
            d.line([center(r, c, cell, pad), center(r2, c2, cell, pad)], fill=ROUTE, width=max(3, cell // 5))
            images.append(writer.save(sketch, f"{rid}-step{j}"))
            cot.append(f"Go {direction} {n} to {common.cell_name(r2, c2)}.")
            steps += [cot[-1], len(images) - 1]
            r, c = r2, c2
        cot.append("That is the goal.")
        steps.append(cot[-1])
        turns = len(runs(m.moves)) - 1
        end = {"first_move": f"The route starts by going {m.moves[0]}.",
               "turns": (f"The route has {turns + 1} straight runs, so it changes direction {turns} times." if turns
                         else "The route is one straight run, so it never changes direction."),
               "reachable": "The route reaches the goal.",
               "route_mc": f"The route is {describe(m.moves)}, which is option {m.answer}."}[qtype]
    else:
        reach = explore(m.cells, m.size, m.start)
        sketch = base.copy()
        d = ImageDraw.Draw(sketch)
        for idx in reach:
            r, c = divmod(idx, m.size)
            d.rectangle([pad + c * cell + 2, pad + r * cell + 2, pad + (c + 1) * cell - 2, pad + (r + 1) * cell - 2],
                        fill=START if idx == m.start else SHADE)
        images.append(writer.save(sketch, f"{rid}-step1"))
        steps = ["Let me shade every cell that can be reached from the start.", 1]
        cot = [f"Start at {common.cell_name(rs, cs)} and follow every open passage: {len(reach)} of the "
               f"{m.size * m.size} cells can be reached, and the goal at {common.cell_name(rg, cg)} is not one of "
               "them, because a wall cuts it off."]
        end = "The goal lies outside the shaded region, so it cannot be reached."
    cot.append(end)
    meta = {"question_type": qtype, "size": m.size, "cells": m.cells, "start": [rs, cs], "goal": [rg, cg],
            "route": describe(m.moves), "text_cot": " ".join(cot + [f"The answer is {m.answer}."])}
    if m.options:
        meta["options"] = m.options
    return common.make_record(rid, "maze", images, [0, m.question], steps + [end], m.answer, meta)


def parser():
    p = common.synthetic_parser("maze", __doc__)
    p.add_argument("--size", type=common.int_range(3, 8), default="5", metavar="N|MIN-MAX",
                   help="maze side in cells, 3 to 8 (a range draws one per maze)")
    p.add_argument("--wall", type=int, choices=range(1, 9), default=2, metavar="PX",
                   help="wall width in pixels (thicker walls survive a model's downscaling of the picture)")
    p.add_argument("--questions", type=common.choices_list(QUESTIONS), default=",".join(QUESTIONS),
                   help="question types, comma-separated")
    return p


def build(args) -> None:
    common.synthesize(args, "maze", VERSION, targets(args), lambda rng, t: sample(rng, t, args.size),
                      lambda m, rid, writer: render(m, rid, writer, args.wall))


def main(argv: list[str] | None = None) -> int:
    return common.run(parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
