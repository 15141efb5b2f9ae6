"""FrozenLake spatial planning as in Mirage's VSP: is an action sequence safe, which sequence reaches the goal.

The map is Mirage's ``map_desc``: rows of 1 (start), 2 (goal), -1 (hole) and 0 (ice); actions are L, R, U, D. Walking
into a hole or off the grid is unsafe; reaching the goal ends the walk. The helper image is the map with the route
drawn; for "is it safe?" it follows the walk written out action by action (as in ``meta.text_cot``), or with
``--walk drawn`` it stands in for that walk (only the drawn route says where the sequence ends). Records keep
``meta.map_desc`` so a free-form answer can be checked with ``simulate``.

    vlatent build-data vsp --out data/vsp --n 1000 --size 3-6 --questions safe,route_mc
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from . import common

VERSION = 2  # 2: "is it safe?" writes the walk out before the drawn route
QUESTIONS = ("safe", "route_mc")
ACTIONS = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}
NAMES = {"L": "left", "R": "right", "U": "up", "D": "down"}
START, GOAL, HOLE, ICE = 1, 2, -1, 0
# Palette: ice, grid line, hole, start, goal, route, failure mark, text.
PALETTE = [205, 232, 250, 120, 150, 170, 25, 45, 95, 60, 170, 70, 240, 190, 40, 220, 50, 160, 200, 20, 20,
           255, 255, 255]
C_ICE, C_LINE, C_HOLE, C_START, C_GOAL, C_ROUTE, C_FAIL, C_TEXT = range(8)
INTRO = ("This is a frozen lake seen from above. S is the start and G is the goal; the dark circles are holes. Actions "
         "are L (left), R (right), U (up) and D (down). Falling into a hole or walking off the grid is unsafe, and "
         "reaching the goal ends the walk.")


def simulate(map_desc: list[list[int]], actions) -> str:
    """Walk ``actions`` (a list, or a string like ``"L,L,U,R"``) from the start of ``map_desc``: ``"goal"`` as soon as
    the goal is reached, ``"hole"`` on falling into a hole, ``"off-grid"`` on leaving the map, else ``"stopped"``."""
    if isinstance(actions, str):
        actions = [a for a in actions.replace(",", " ").split() if a]
    rows, cols = len(map_desc), len(map_desc[0])
    r, c = next((r, c) for r in range(rows) for c in range(cols) if map_desc[r][c] == START)
    for a in actions:
        if a not in ACTIONS:
            raise ValueError(f"unknown action {a!r}; expected one of L, R, U, D")
        r, c = r + ACTIONS[a][0], c + ACTIONS[a][1]
        if not (0 <= r < rows and 0 <= c < cols):
            return "off-grid"
        if map_desc[r][c] == HOLE:
            return "hole"
        if map_desc[r][c] == GOAL:
            return "goal"
    return "stopped"


@dataclass
class Problem:
    map_desc: list[list[int]]
    qtype: str
    question: str
    answer: str
    actions: list[str]  # the sequence asked about (safe) or the right one (route_mc)
    options: list[str] = field(default_factory=list)

    @property
    def key(self):
        return tuple(map(tuple, self.map_desc)), self.question


def find(map_desc, value) -> tuple[int, int]:
    return next((r, c) for r, row in enumerate(map_desc) for c, v in enumerate(row) if v == value)


def shortest_route(rng, map_desc) -> list[str] | None:
    """A shortest safe action sequence from start to goal (ties broken at random), or None."""
    rows, cols = len(map_desc), len(map_desc[0])
    start = find(map_desc, START)
    prev = {start: None}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if map_desc[r][c] == GOAL:
            actions = []
            while prev[(r, c)] is not None:
                (r, c), a = prev[(r, c)]
                actions.append(a)
            return actions[::-1]
        for a in rng.sample(list(ACTIONS), 4):
            nr, nc = r + ACTIONS[a][0], c + ACTIONS[a][1]
            if 0 <= nr < rows and 0 <= nc < cols and map_desc[nr][nc] != HOLE and (nr, nc) not in prev:
                prev[(nr, nc)] = ((r, c), a)
                queue.append((nr, nc))
    return None


def random_map(rng, size: int) -> list[list[int]]:
    cells = [(r, c) for r in range(size) for c in range(size)]
    start, goal = rng.sample(cells, 2)
    holes = set(rng.sample([x for x in cells if x not in (start, goal)], round(rng.uniform(0.15, 0.35) * size * size)))
    return [[START if (r, c) == start else GOAL if (r, c) == goal else HOLE if (r, c) in holes else ICE
             for c in range(size)] for r in range(size)]


def walk_sequence(rng, map_desc, length: int) -> list[str]:
    """A random walk that mostly picks safe actions; it ends at the goal, and may go on for a step or two after a
    failure (so the failure is not always the last action)."""
    actions = []
    for _ in range(length):
        safe = [a for a in ACTIONS if simulate(map_desc, actions + [a]) in ("stopped", "goal")]
        actions.append(rng.choice(safe) if safe and rng.random() < 0.85 else rng.choice(list(ACTIONS)))
        outcome = simulate(map_desc, actions)
        if outcome == "goal":
            break
        if outcome != "stopped":
            return actions + [rng.choice(list(ACTIONS)) for _ in range(rng.randint(0, 2))]
    return actions


def wrong_sequences(rng, map_desc, right: list[str]) -> list[list[str]]:
    """Three sequences one edit away from the right one (an action changed, dropped, added or two swapped) that do not
    reach the goal."""
    found = {}
    for _ in range(60):
        s = list(right)
        k = rng.randrange(len(s))
        edit = rng.choice(("change", "drop", "add", "swap"))
        if edit == "change":
            s[k] = rng.choice([a for a in ACTIONS if a != s[k]])
        elif edit == "drop" and len(s) > 1:
            del s[k]
        elif edit == "add":
            s.insert(k, rng.choice(list(ACTIONS)))
        elif edit == "swap" and k + 1 < len(s) and s[k] != s[k + 1]:
            s[k], s[k + 1] = s[k + 1], s[k]
        else:
            continue
        if simulate(map_desc, s) != "goal" and s != right:
            found[",".join(s)] = s
        if len(found) == 3:
            return list(found.values())
    return []


def targets(args) -> list[tuple[str, str]]:
    answers = {"safe": ["yes", "no"], "route_mc": list(common.LETTERS[:4])}
    return common.cycle_targets({q: answers[q] for q in args.questions})


def sample(rng, target, size_range, length=None) -> Problem | None:
    """A problem whose question ``target[0]`` has the answer ``target[1]``; ``length``: (min, max) actions of a "safe"
    question's sequence (default: 2 to twice the map side)."""
    qtype, answer = target
    map_desc = random_map(rng, rng.randint(*size_range))
    right = shortest_route(rng, map_desc)
    if right is None or len(right) < 2:
        return None
    if qtype == "safe":
        actions = walk_sequence(rng, map_desc, rng.randint(*(length or (2, 2 * len(map_desc)))))
        if (simulate(map_desc, actions) in ("goal", "stopped")) != (answer == "yes") or len(actions) < 2:
            return None
        question = f"{INTRO} Is the action sequence {','.join(actions)} safe? Answer yes or no."
        return Problem(map_desc, qtype, question, answer, actions)
    wrong = wrong_sequences(rng, map_desc, right)
    if not wrong:
        return None
    wrong.insert(common.LETTERS.index(answer), right)
    options = [",".join(s) for s in wrong]
    question = common.multiple_choice(f"{INTRO} Which action sequence reaches the goal?", options)
    return Problem(map_desc, qtype, question, answer, right, options)


def draw(map_desc, actions: list[str]) -> tuple[Image.Image, Image.Image]:
    """The map, and the map with ``actions`` drawn from the start (a cross where the walk fails)."""
    size = len(map_desc)
    cell, pad = 176 // size, 8
    side = cell * size + 2 * pad
    im = Image.new("P", (side, side), C_ICE)
    im.putpalette(PALETTE)
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(max(10, cell // 2))
    for r, row in enumerate(map_desc):
        for c, v in enumerate(row):
            x, y = pad + c * cell, pad + r * cell
            d.rectangle([x, y, x + cell, y + cell], outline=C_LINE)
            if v == HOLE:
                d.ellipse([x + cell // 6, y + cell // 6, x + cell - cell // 6, y + cell - cell // 6], fill=C_HOLE)
            elif v in (START, GOAL):
                d.rectangle([x + 3, y + 3, x + cell - 3, y + cell - 3], fill=C_START if v == START else C_GOAL)
                d.text((x + cell / 2, y + cell / 2), "S" if v == START else "G", fill=C_TEXT, font=font, anchor="mm")
    routed = im.copy()
    d = ImageDraw.Draw(routed)
    r, c = find(map_desc, START)
    points = [(r, c)]
    for a in actions:
        r, c = r + ACTIONS[a][0], c + ACTIONS[a][1]
        points.append((r, c))
        if not (0 <= r < size and 0 <= c < size) or map_desc[r][c] in (HOLE, GOAL):
            break
    xy = [(pad + c * cell + cell // 2, pad + r * cell + cell // 2) for r, c in points]
    d.line(xy, fill=C_ROUTE, width=max(3, cell // 6), joint="curve")
    if simulate(map_desc, actions) in ("hole", "off-grid"):
        (x, y), k = xy[-1], cell // 4
        d.line([x - k, y - k, x + k, y + k], fill=C_FAIL, width=4)
        d.line([x - k, y + k, x + k, y - k], fill=C_FAIL, width=4)
    return im, routed


def explain(map_desc, actions: list[str]) -> str:
    """The walk in words, action by action."""
    r, c = find(map_desc, START)
    words = [f"Start at {common.cell_name(r, c)}."]
    for a in actions:
        r, c = r + ACTIONS[a][0], c + ACTIONS[a][1]
        if not (0 <= r < len(map_desc) and 0 <= c < len(map_desc)):
            return " ".join(words + [f"{a} walks off the grid."])
        kind = {HOLE: "a hole", GOAL: "the goal", START: "the start", ICE: "ice"}[map_desc[r][c]]
        words.append(f"{a} goes {NAMES[a]} to {common.cell_name(r, c)}: {kind}.")
        if map_desc[r][c] in (HOLE, GOAL):
            break
    return " ".join(words)


def render(p: Problem, rid: str, writer: common.DatasetWriter, walk: str = "words") -> dict:
    plain, routed = draw(p.map_desc, p.actions)
    images = [writer.save(plain, rid), writer.save(routed, f"{rid}-route")]
    outcome = simulate(p.map_desc, p.actions)
    if p.qtype == "safe":
        verdict = {"hole": "falls into a hole, so it is not safe.",
                   "off-grid": "walks off the grid, so it is not safe.",
                   "goal": "reaches the goal without touching a hole, so it is safe.",
                   "stopped": "stays on the ice all the way, so it is safe."}[outcome]
        # the walk in words (as the text CoT has it), then the drawn walk as the latent step, then the verdict;
        # "drawn": no words between question and drawing, so the verdict can only come from the drawn route
        walked = ([f"Let me draw the route {','.join(p.actions)} on the map."] if walk == "drawn" else
                  ["Let me walk this sequence on the map.", explain(p.map_desc, p.actions)])
        steps = [*walked, 1, f"The drawn route {verdict}"]
        cot = f"{explain(p.map_desc, p.actions)} The sequence {verdict}"
    else:
        steps = ["Let me draw a safe route from S to G on the map.", 1,
                 f"The route {','.join(p.actions)} reaches the goal without touching a hole; it is option {p.answer}."]
        fates = {"hole": "falls into a hole", "off-grid": "walks off the grid", "stopped": "stops short of the goal"}
        others = [f"option {common.LETTERS[i]} {fates[simulate(p.map_desc, o)]}" for i, o in enumerate(p.options)
                  if common.LETTERS[i] != p.answer]
        cot = (f"{explain(p.map_desc, p.actions)} So {','.join(p.actions)} reaches the goal safely, while "
               f"{', '.join(others[:-1])} and {others[-1]}. That is option {p.answer}.")
    meta = {"question_type": p.qtype, "map_desc": p.map_desc, "actions": p.actions,
            "text_cot": f"{cot} The answer is {p.answer}."}
    if p.options:
        meta["options"] = p.options
    return common.make_record(rid, "vsp", images, [0, p.question], steps, p.answer, meta)


def parser():
    p = common.synthetic_parser("vsp", __doc__)
    p.add_argument("--size", type=common.int_range(3, 8), default="3-6", metavar="N|MIN-MAX",
                   help="map side in cells, 3 to 8 (a range draws one per map)")
    p.add_argument("--length", type=common.int_range(2, 16), default=None, metavar="N|MIN-MAX",
                   help="actions in a 'safe' question's sequence (default: 2 to twice the map side)")
    p.add_argument("--questions", type=common.choices_list(QUESTIONS), default=",".join(QUESTIONS),
                   help="question types, comma-separated")
    p.add_argument("--walk", choices=("words", "drawn"), default="words",
                   help="'is it safe?' latent records: the walk written out before the drawn route (words) or only "
                        "the drawn route (drawn: the latent step carries the walk); meta.text_cot is the same")
    return p


def build(args) -> None:
    common.synthesize(args, "vsp", VERSION, targets(args), lambda rng, t: sample(rng, t, args.size, args.length),
                      lambda p, rid, writer: render(p, rid, writer, args.walk))


def main(argv: list[str] | None = None) -> int:
    return common.run(parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
