"""Data builders: every synthetic task builds a loadable, balanced, de-duplicated, deterministic dataset with right
answers; each converter maps its public schema field by field; bad input is an error with exit code 2, never a
half-written split."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict, deque
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the apps are not installed packages; import them from the checkout, as the CLI does

from data_builders import BUILDERS, maze, vsp  # noqa: E402
from data_builders.__main__ import main  # noqa: E402
from vlatent.cli import main as vlatent_main  # noqa: E402
from vlatent.data import load_records  # noqa: E402

SPLITS = ("train", "val", "test")
SMALL = {"maze": ["--size", "3-6"], "vsp": [], "jigsaw": [], "depth": [], "count": []}


def build(name, out, *args, n=48, seed=0):
    return main([name, "--out", str(out), "--n", str(n), "--seed", str(seed), *SMALL.get(name, []), *args])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each synthetic task built once: {name: folder}."""
    root = tmp_path_factory.mktemp("built")
    for name in BUILDERS:
        assert build(name, root / name) == 0
    return {name: root / name for name in BUILDERS}


def assistant_text(record):
    return " ".join(c["text"] for m in record["messages"] if m["role"] == "assistant" for c in m["content"]
                    if c["type"] == "text")


def user_text(record):
    return " ".join(c["text"] for c in record["messages"][0]["content"] if c["type"] == "text")


def latents(record):
    return [c["image"] for m in record["messages"] for c in m["content"] if c["type"] == "latent"]


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic tasks


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_writes_valid_balanced_records(built, name):
    folder = built[name]
    info = json.loads((folder / "dataset_info.json").read_text())
    assert info["builder"] == name and info["version"] >= 1 and info["seed"] == 0 and info["arguments"]["n"] == 48
    assert sorted(p.name for p in folder.iterdir()) == ["dataset_info.json", "images", "test.jsonl", "train.jsonl",
                                                        "val.jsonl"]
    for split in SPLITS:
        records = load_records(folder, split=split)
        assert len(records) == info["counts"][split] > 0
        assert Counter(r["answer"] for r in records) == Counter(info["answers"][split])
        by_type = defaultdict(Counter)
        for r in records:
            assert r["task"] == name and r["id"].startswith(f"{name}-{split}-")
            assert r["messages"][0]["content"][0] == {"type": "image", "image": 0}
            assert latents(r), "every synthetic example thinks through at least one latent step"
            assert assistant_text(r).endswith(f"The answer is {r['answer']}.")
            assert r["meta"]["text_cot"].endswith(f"The answer is {r['answer']}.") and "{" not in r["meta"]["text_cot"]
            if "options" in r["meta"]:
                letters = "ABCD"[:len(r["meta"]["options"])]
                assert r["answer"] in letters
                assert "\n".join(f"{k}. {o}" for k, o in zip(letters, r["meta"]["options"])) in user_text(r)
            by_type[r["meta"]["question_type"]][r["answer"]] += 1
        for counts in by_type.values():  # every answer of a question type as often as any other, give or take one
            assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert sum(info["counts"].values()) == 48 and info["counts"]["train"] > info["counts"]["val"]


@pytest.mark.parametrize("name", BUILDERS)
def test_no_duplicates_within_or_across_splits(built, name):
    """Same question text and same question images = the same example."""
    keys = Counter()
    for split in SPLITS:
        for r in load_records(built[name], split=split):
            shown = [r["images"][c["image"]] for c in r["messages"][0]["content"] if c["type"] == "image"]
            keys[(user_text(r), *(hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in shown))] += 1
    assert max(keys.values()) == 1


@pytest.mark.parametrize("name", BUILDERS)
def test_loads_with_hf_datasets(built, name, tmp_path):
    folder = built[name]
    ds = datasets.load_dataset("json", data_files={s: str(folder / f"{s}.jsonl") for s in SPLITS},
                               cache_dir=str(tmp_path / "cache"))
    info = json.loads((folder / "dataset_info.json").read_text())
    assert {s: len(ds[s]) for s in SPLITS} == info["counts"]
    assert len(load_records(ds["train"], root=folder)) == info["counts"]["train"]


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for out, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert build("maze", tmp_path / out, n=20, seed=seed) == 0
    for split in SPLITS:
        a, b, c = ((tmp_path / out / f"{split}.jsonl").read_bytes() for out in "abc")
        assert a == b and a != c
    images = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert images and all((tmp_path / "a" / "images" / p).read_bytes() == (tmp_path / "b" / "images" / p).read_bytes()
                          for p in images)


def bfs(cells, size, start):
    """Independent check of the maze builder: the move sequence to every reachable cell."""
    steps = {"up": (-size, 1), "down": (size, 2), "left": (-1, 4), "right": (1, 8)}
    routes, queue = {start: []}, deque([start])
    while queue:
        cell = queue.popleft()
        for d, (delta, bit) in steps.items():
            if cells[cell] & bit and cell + delta not in routes:
                routes[cell + delta] = routes[cell] + [d]
                queue.append(cell + delta)
    return routes


def follows(cells, size, start, route_text):
    steps = {"up": (-size, 1), "down": (size, 2), "left": (-1, 4), "right": (1, 8)}
    cell = start
    for run in route_text.split(", "):
        d, n = run.split()
        for _ in range(int(n)):
            if not cells[cell] & steps[d][1]:
                return None
            cell += steps[d][0]
    return cell


def test_maze_answers_are_right(built):
    seen = Counter()
    for split in SPLITS:
        for r in load_records(built["maze"], split=split):
            m = r["meta"]
            size = m["size"]
            start, goal = m["start"][0] * size + m["start"][1], m["goal"][0] * size + m["goal"][1]
            routes = bfs(m["cells"], size, start)
            qtype = m["question_type"]
            seen[qtype] += 1
            if qtype == "reachable":
                assert r["answer"] == ("yes" if goal in routes else "no")
            if goal not in routes:
                assert qtype == "reachable" and len(latents(r)) == 1
                continue
            route = routes[goal]
            run_count = 1 + sum(a != b for a, b in zip(route, route[1:]))
            assert len(latents(r)) == run_count  # one latent step per straight run
            # the text before each latent step names the run and the cell where it ends (the route walked here)
            turn = r["messages"][-1]["content"]
            cell, ends = start, []
            for j, move in enumerate(route):
                cell += {"up": -size, "down": size, "left": -1, "right": 1}[move]
                if j + 1 == len(route) or route[j + 1] != move:
                    ends.append(f"to row {cell // size + 1}, column {cell % size + 1}.")
            before = [turn[i - 1]["text"] for i, item in enumerate(turn) if item["type"] == "latent"]
            assert [t.endswith(e) for t, e in zip(before, ends)] == [True] * run_count, (before, ends)
            assert turn[-1]["text"].startswith("That is the goal.")
            assert follows(m["cells"], size, start, m["route"]) == goal and len(route) >= 2
            if qtype == "first_move":
                assert r["answer"] == route[0]
            elif qtype == "turns":
                assert r["answer"] == str(run_count - 1)
            elif qtype == "route_mc":
                for letter, option in zip("ABCD", m["options"]):
                    assert (follows(m["cells"], size, start, option) == goal) == (letter == r["answer"])
    assert set(seen) == set(maze.QUESTIONS)


def test_vsp_simulate():
    lake = [[1, 0, -1],
            [0, 0, 0],
            [-1, 0, 2]]
    assert vsp.simulate(lake, ["R", "D", "D", "R"]) == "goal"
    assert vsp.simulate(lake, "R,D,D,R,U") == "goal"  # the walk ends at the goal
    assert vsp.simulate(lake, "R,R") == "hole"
    assert vsp.simulate(lake, ["U"]) == "off-grid"
    assert vsp.simulate(lake, ["D", "R"]) == "stopped"
    assert vsp.simulate(lake, []) == "stopped"
    with pytest.raises(ValueError, match="unknown action 'X'"):
        vsp.simulate(lake, "R,X")


def test_vsp_answers_check_out_by_simulation(built):
    for split in SPLITS:
        for r in load_records(built["vsp"], split=split):
            m = r["meta"]
            assert sum(v == 1 for row in m["map_desc"] for v in row) == 1 == sum(v == 2 for row in m["map_desc"]
                                                                                   for v in row)
            if m["question_type"] == "safe":
                assert f"Is the action sequence {','.join(m['actions'])} safe?" in user_text(r)
                assert r["answer"] == ("yes" if vsp.simulate(m["map_desc"], m["actions"]) in ("goal", "stopped")
                                       else "no")
                # the walk is written out cell by cell before the drawn route (the latent step)
                size = len(m["map_desc"])
                (row, col), = [(i, j) for i in range(size) for j in range(size) if m["map_desc"][i][j] == 1]
                said = []
                for a in m["actions"]:
                    row, col = row + {"U": -1, "D": 1}.get(a, 0), col + {"L": -1, "R": 1}.get(a, 0)
                    if not (0 <= row < size and 0 <= col < size):
                        said.append(f"{a} walks off the grid.")
                        break
                    said.append(f"to row {row + 1}, column {col + 1}")
                    if m["map_desc"][row][col] in (-1, 2):
                        break
                turn = r["messages"][-1]["content"]
                assert [item["type"] for item in turn] == ["text", "latent", "text"]
                assert all(x in turn[0]["text"] for x in said) and turn[0]["text"].count(" goes ") == len(
                    [x for x in said if x.startswith("to row")]), (turn[0]["text"], said)
            else:
                for letter, option in zip("ABCD", m["options"]):
                    assert (vsp.simulate(m["map_desc"], option) == "goal") == (letter == r["answer"])


def test_depth_map_is_saved_and_brighter_at_the_closer_point(built):
    for r in load_records(built["depth"], split="train"):
        m = r["meta"]
        depth_map = Image.open(built["depth"] / m["depth_map"])
        assert depth_map.mode == "L" and r["images"][latents(r)[0]].endswith(m["depth_map"])
        closer = min(m["depths"], key=m["depths"].get)
        assert closer == r["answer"] and max(m["depths"].values()) >= 1.25 * min(m["depths"].values())
        gray = {k: depth_map.getpixel(tuple(m["points"][k])) for k in "AB"}
        assert gray[r["answer"]] > gray["B" if r["answer"] == "A" else "A"]


def test_depth_text_cot_names_the_point_that_stands_lower_as_nearer(built):
    """The point of smaller depth is the one said to stand lower and to be closer, in that order."""
    for r in load_records(built["depth"], split="train"):
        m, cot = r["meta"], r["meta"]["text_cot"]
        near, far = sorted("AB", key=m["depths"].get)
        assert cot.endswith(f" Point {near} stands lower than point {far}, so point {near} is closer to the camera "
                            f"than point {far}. The answer is {near}."), cot
        assert not re.search(r"\d", cot)  # no number a model cannot read off the picture


def test_count_boxes_the_counted_objects(built):
    for r in load_records(built["count"], split="train"):
        assert len(r["meta"]["boxes"]) == int(r["answer"]) and f"{r['meta']['color']} {r['meta']['shape']}s" in \
            user_text(r)


def test_jigsaw_helper_is_the_completed_picture(built):
    for r in load_records(built["jigsaw"], split="val"):
        holed, full = Image.open(r["images"][0]).convert("RGB"), Image.open(r["images"][2]).convert("RGB")
        assert holed.size == full.size and latents(r) == [2]
        diff = sum(a != b for a, b in zip(holed.getdata(), full.getdata()))
        tile = (holed.width // r["meta"]["grid"]) ** 2
        assert 0 < diff <= tile  # they differ only inside the missing tile


# ---------------------------------------------------------------------------------------------------------------------
# Converters: fixtures in each public schema, written here


def png(path, color, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def converted(out):
    records = load_records(out, split="train")
    assert (out / "val.jsonl").read_text() == "" and json.loads((out / "dataset_info.json").read_text())
    return {r["id"]: r for r in records}


def same_image(record_path, source):
    return Path(record_path).read_bytes() == Path(source).read_bytes()


def test_mirage_converter(tmp_path):
    src = tmp_path / "src"
    q, h, q2 = png(src / "imgs/q.png", "red"), png(src / "imgs/h.png", "blue"), png(src / "imgs/q2.png", "green")
    rows = [{"id": "vsp-1", "text_input": "<image>\nIs R,D safe?", "image_input": ["imgs/q.png"],
             "text_output": "<think>I draw the route. <output_image> It avoids the holes.</think> \\boxed{yes}",
             "image_output": "imgs/h.png", "map_desc": [[1, 0], [-1, 2]]},
            {"id": "jig-2", "text_input": "Which piece fits?", "image_input": "imgs/q2.png",
             "text_output": "<think>Filling the gap shows \\boxed{B} fits.</think>", "image_output": "imgs/h.png"}]
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["mirage", "--source", str(src / "train.jsonl"), "--out", str(out), "--split", "1,0,0",
                 "--task", "vsp"]) == 0
    recs = converted(out)
    a, b = recs["vsp-1"], recs["jig-2"]
    assert same_image(a["images"][0], q) and same_image(a["images"][1], h) and a["task"] == "vsp"
    assert a["messages"] == [
        {"role": "user", "content": [{"type": "image", "image": 0}, {"type": "text", "text": "Is R,D safe?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "I draw the route."}, {"type": "latent", "image": 1},
                                          {"type": "text", "text": "It avoids the holes. The answer is yes."}]}]
    assert a["answer"] == "yes"
    assert a["meta"] == {"map_desc": [[1, 0], [-1, 2]],
                         "text_cot": "I draw the route. It avoids the holes. The answer is yes."}
    # No <image> marker: the input image goes first; no <output_image>: the helper image starts the answer.
    assert same_image(b["images"][0], q2) and b["answer"] == "B"
    assert b["messages"][0]["content"] == [{"type": "image", "image": 0}, {"type": "text", "text": "Which piece fits?"}]
    assert b["messages"][1]["content"] == [{"type": "latent", "image": 1},
                                           {"type": "text", "text": "Filling the gap shows B fits. The answer is B."}]
    assert "map_desc" not in b["meta"]


def test_mirage_converter_keep_boxed_keeps_the_answer_as_written(tmp_path):
    src = tmp_path / "src"
    png(src / "q.png", "red"), png(src / "h.png", "blue")
    row = {"id": "vsp-1", "text_input": "<image>\nIs R,D safe?", "image_input": "q.png", "image_output": "h.png",
           "text_output": "<think>I draw the route. <output_image> It avoids the holes.</think> \\boxed{yes}"}
    (src / "train.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "out"
    assert main(["mirage", "--source", str(src / "train.jsonl"), "--out", str(out), "--split", "1,0,0",
                 "--keep-boxed"]) == 0
    a = converted(out)["vsp-1"]
    assert a["messages"][1]["content"] == [{"type": "text", "text": "<think>I draw the route."},
                                           {"type": "latent", "image": 1},
                                           {"type": "text", "text": "It avoids the holes.</think> \\boxed{yes}"}]
    assert a["answer"] == "yes"
    assert a["meta"]["text_cot"] == "<think>I draw the route. It avoids the holes.</think> \\boxed{yes}"


def test_monet_converter(tmp_path):
    src = tmp_path / "src"
    png(src / "x/q.jpg", "red"), png(src / "x/crop.jpg", "blue")
    item = {"data": [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image", "image_file_name": "x/q.jpg"},
                                     {"type": "text", "text": "What does the sign say? Put the answer in \\boxed{}."}]},
        {"role": "assistant", "content": [
            {"type": "text",
             "text": "<observation>A sign.</observation> Let me zoom in. <abs_vis_token></abs_vis_token>"},
            {"type": "image", "image": "x/crop.jpg"},
            {"type": "text", "text": "<observation>It reads 42.</observation> So the answer is \\boxed{42}."}]}],
        "metadata": {"dataset_name": "Zebra_CoT_count", "sample_id": 17}}
    bad = json.loads(json.dumps(item))
    bad["data"][2]["content"][0]["text"] = "Let me zoom in."  # no <abs_vis_token></abs_vis_token> before the image
    bad["metadata"]["sample_id"] = 18
    (src / "train.json").write_text(json.dumps([item, bad]))
    out = tmp_path / "out"
    assert main(["monet", "--source", str(src / "train.json"), "--out", str(out), "--split", "1,0,0",
                 "--skip-bad"]) == 0
    recs = converted(out)
    assert list(recs) == ["Zebra_CoT_count-17"]
    r = recs["Zebra_CoT_count-17"]
    assert same_image(r["images"][0], src / "x/q.jpg") and same_image(r["images"][1], src / "x/crop.jpg")
    assert r["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image", "image": 0},
                                     {"type": "text", "text": "What does the sign say? Put the answer in \\boxed{}."}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "A sign. Let me zoom in."},  # observation tags before the first image dropped
            {"type": "latent", "image": 1},
            {"type": "text", "text": "It reads 42.", "observation": True},
            {"type": "text", "text": "So the answer is 42. The answer is 42."}]}]
    assert r["answer"] == "42" and r["task"] == "Zebra_CoT_count"
    assert r["meta"] == {"dataset_name": "Zebra_CoT_count", "sample_id": "17",
                         "text_cot": "A sign. Let me zoom in. It reads 42. So the answer is 42. The answer is 42."}
    assert json.loads((out / "dataset_info.json").read_text())["skipped"] == 1


def test_zebra_cot_converter_reads_jsonl_and_parquet_with_embedded_images(tmp_path):
    src = tmp_path / "src"
    p1, r1, r2 = png(src / "p1.png", "red"), png(src / "r1.png", "blue"), png(src / "r2.png", "green")
    row = {"Question": "Find the exit. <image_start>[problem_image_1]<image_end> Which way?",
           "Text Reasoning Trace": "THOUGHT 0: Trace the corridor. <image_start>[reasoning_image_1]<image_end> "
                                   "THOUGHT 1: Then turn. <image_start>[reasoning_image_2]<image_end> THOUGHT 2: Done.",
           "Final Answer": "left", "problem_image_1": "p1.png", "reasoning_image_1": "r1.png",
           "reasoning_image_2": {"path": "r2.png"}, "reasoning_image_3": None}
    expected = [
        {"role": "user", "content": [{"type": "text", "text": "Find the exit."}, {"type": "image", "image": 0},
                                     {"type": "text", "text": "Which way?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "THOUGHT 0: Trace the corridor."},
                                          {"type": "latent", "image": 1},
                                          {"type": "text", "text": "THOUGHT 1: Then turn."},
                                          {"type": "latent", "image": 2},
                                          {"type": "text", "text": "THOUGHT 2: Done. The answer is left."}]}]
    (src / "maze.jsonl").write_text(json.dumps(row) + "\n")
    as_bytes = {**row, **{k: {"bytes": Path(src / v if isinstance(v, str) else src / v["path"]).read_bytes(),
                              "path": None} for k, v in row.items() if k.endswith(("_1", "_2"))}}
    pq.write_table(pa.Table.from_pylist([as_bytes]), src / "maze.parquet")
    for source in ("maze.jsonl", "maze.parquet"):
        out = tmp_path / source
        assert main(["zebra_cot", "--source", str(src / source), "--out", str(out), "--split", "1,0,0",
                     "--task", "maze"]) == 0
        (r,) = converted(out).values()
        assert r["id"] == "maze-000000" and r["task"] == "maze" and r["answer"] == "left"
        assert r["messages"] == expected
        assert [Path(p).read_bytes() for p in r["images"]] == [p1.read_bytes(), r1.read_bytes(), r2.read_bytes()]
        assert r["meta"]["text_cot"] == ("THOUGHT 0: Trace the corridor. THOUGHT 1: Then turn. THOUGHT 2: Done. "
                                         "The answer is left.")


def test_llava_converter(tmp_path):
    src = tmp_path / "src"
    png(src / "coco/1.jpg", "red")
    rows = [{"id": "000000033471", "image": "coco/1.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the bus?"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Is it moving?"},
                {"from": "gpt", "value": "No, it is parked."}]},
            {"id": 7, "image": "coco/1.jpg", "conversations": [  # no <image> marker: the image goes first
                {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A red bus."}]},
            {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"},
                                                  {"from": "gpt", "value": "Hello!"}]}]
    (src / "llava.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    assert main(["llava", "--source", str(src / "llava.json"), "--out", str(out), "--split", "1,0,0"]) == 0
    recs = converted(out)
    a = recs["000000033471"]
    assert same_image(a["images"][0], src / "coco/1.jpg")
    assert a["answer"] == "No, it is parked." and a["task"] == "llava"
    assert a["messages"] == [
        {"role": "user", "content": [{"type": "image", "image": 0},
                                     {"type": "text", "text": "What colour is the bus?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it moving?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No, it is parked."}]}]
    assert recs["7"]["messages"][0]["content"] == [{"type": "image", "image": 0},
                                                   {"type": "text", "text": "Describe it."}]
    assert recs["7"]["images"] == a["images"]  # a shared source image is copied once
    assert recs["text-only"]["images"] == [] and recs["text-only"]["answer"] == "Hello!"
    assert not any(latents(r) for r in recs.values())
    assert len(list((out / "images").iterdir())) == 1


def test_converter_stops_on_a_bad_record_unless_skip_bad(tmp_path, capsys):
    src = tmp_path / "src"
    png(src / "ok.png", "red")
    rows = [{"id": "good", "image": "ok.png", "conversations": [{"from": "human", "value": "<image> ?"},
                                                                {"from": "gpt", "value": "ok"}]},
            {"id": "bad", "image": "missing.png", "conversations": [{"from": "human", "value": "<image> ?"},
                                                                    {"from": "gpt", "value": "ok"}]}]
    (src / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    args = ["llava", "--source", str(src / "s.jsonl"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "s.jsonl line 2" in err and "missing.png" in err and "does not exist" in err and "--skip-bad" in err
    assert not (tmp_path / "out" / "train.jsonl").exists() and not list((tmp_path / "out").glob("*.tmp"))
    assert main([*args, "--skip-bad", "--split", "1,0,0"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 record(s)" in err and "s.jsonl line 3: invalid JSON" in err
    assert list(converted(tmp_path / "out")) == ["good"]


# ---------------------------------------------------------------------------------------------------------------------
# Bad input, interruption, tools, command line


@pytest.mark.parametrize("args, message", [
    (["maze", "--n", "0"], "--n: expected a positive integer, got 0"),
    (["maze", "--size", "9"], "--size: expected N or MIN-MAX between 3 and 8, got '9'"),
    (["maze", "--questions", "first_move,teleport"], "unknown option 'teleport'"),
    (["vsp", "--split", "0.5,0.5"], "three fractions"),
    (["count", "--max-count", "9", "--max-objects", "10"], "--max-objects (10) must leave room"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, args, message):
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_output_parents_are_created_and_bad_sources(tmp_path, capsys):
    assert main(["maze", "--out", str(tmp_path / "no" / "such" / "dir"), "--n", "10", "--size", "4"]) == 0
    assert len((tmp_path / "no" / "such" / "dir" / "train.jsonl").read_text().splitlines()) == 8  # 80% of 10
    (tmp_path / "file").write_text("")
    assert main(["maze", "--out", str(tmp_path / "file" / "dir")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    assert main(["llava", "--source", str(tmp_path / "broken.json"), "--out", str(tmp_path / "o")]) == 2
    assert "broken.json: invalid JSON" in capsys.readouterr().err
    assert main(["mirage", "--source", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["teleport"]) == 2 and "unknown builder 'teleport'" in capsys.readouterr().err


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_rebuild_leaves_the_old_dataset_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "maze"
    assert build("maze", out, n=10) == 0  # a finished build, then an interrupted rebuild into the same folder
    before = snapshot(out)
    calls = []

    def render_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return maze_render(*args)

    maze_render = maze.render
    monkeypatch.setattr(maze, "render", render_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build("maze", out, "--overwrite", n=30)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["maze"]  # no temporary left
    assert main(["validate", str(out)]) == 0


def llava_source(path, image="a.png"):
    """A one-record LLaVA file at ``path`` whose image is ``image`` beside it."""
    png(path.parent / "a.png", "red")
    path.write_text(json.dumps({"id": "r1", "image": image, "conversations": [
        {"from": "human", "value": "<image> What colour?"}, {"from": "gpt", "value": "Red."}]}) + "\n")
    return path


def test_a_converter_never_deletes_its_own_source(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    source = llava_source(d / "train.jsonl")  # the command: the source is what --out would hold
    before = snapshot(d)
    for extra in ([], ["--overwrite"]):
        assert main(["llava", "--source", str(source), "--out", str(d), *extra]) == 2
        err = capsys.readouterr().err
        assert f"--out {d} holds a dataset and this build's source" in err and "another --out" in err
        assert snapshot(d) == before
    other = tmp_path / "e"  # a source in a folder without a dataset: the dataset is written beside it
    other.mkdir()
    source = llava_source(other / "llava.jsonl")
    assert main(["llava", "--source", str(source), "--out", str(other), "--split", "1,0,0"]) == 0
    assert source.read_bytes() == before["train.jsonl"] and list(converted(other)) == ["r1"]


def test_a_failing_conversion_leaves_an_existing_dataset_as_it_was(tmp_path, capsys):
    out = tmp_path / "maze"
    assert build("maze", out, n=10) == 0
    before = snapshot(out)
    bad = llava_source(tmp_path / "src" / "bad.jsonl", image="missing.png")
    assert main(["llava", "--source", str(bad), "--out", str(out)]) == 2  # refused: no --overwrite
    assert f"{out} already holds a dataset (dataset_info.json, train.jsonl, val.jsonl, test.jsonl, images); pass " \
           "--overwrite to replace it" in capsys.readouterr().err
    assert main(["llava", "--source", str(bad), "--out", str(out), "--overwrite"]) == 2  # fails half-way
    assert "missing.png" in capsys.readouterr().err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["maze", "src"]
    assert main(["validate", str(out)]) == 0


def test_rebuilding_replaces_a_dataset_only_with_overwrite_and_keeps_no_old_image(tmp_path, capsys):
    out, fresh = tmp_path / "maze", tmp_path / "fresh"
    assert build("maze", out, n=20) == 0
    before = snapshot(out)
    assert build("maze", out, n=6, seed=1) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err and snapshot(out) == before
    assert build("maze", out, "--overwrite", n=6, seed=1) == 0
    assert build("maze", fresh, "--overwrite", n=6, seed=1) == 0  # --overwrite into a new folder: a plain build
    rebuilt, expected = snapshot(out), snapshot(fresh)
    info = json.loads(rebuilt.pop("dataset_info.json"))
    assert info["arguments"]["n"] == 6 and info["counts"] == json.loads(expected.pop("dataset_info.json"))["counts"]
    assert rebuilt == expected  # the same splits and exactly the same images as a build into an empty folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "maze"]


def test_validate_prints_a_summary_and_names_bad_records(built, tmp_path, capsys):
    assert main(["validate", str(built["maze"])]) == 0
    out = capsys.readouterr().out
    assert "maze v2, seed 0" in out and "train: 38 records" in out and "latents/record" in out
    assert "ok: 48 records in 3 split(s)" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (built["count"] / "train.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["messages"][1]["content"][1]["image"] = 9
    (bad / "train.jsonl").write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    shutil.copytree(built["count"] / "images", bad / "images")  # a symlink out of the dataset is refused
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "record 'count-train-000001'" in err and "messages[1].content[1].image" in err


def test_preview_draws_a_grid(built, tmp_path, capsys):
    assert main(["preview", str(built["maze"]), "--n", "3", "--out", str(tmp_path / "grid.png")]) == 0
    with Image.open(tmp_path / "grid.png") as im:
        assert im.width > 400 and im.height > 600
    assert "3 examples" in capsys.readouterr().out


def test_command_line_entry_points(tmp_path, capsys):
    assert vlatent_main(["build-data"]) == 0 and main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in (*BUILDERS, "mirage", "monet", "zebra_cot", "llava", "validate", "preview"))
    assert main(["maze", "--help"]) == 0 and "--questions" in capsys.readouterr().out
    assert vlatent_main(["build-data", "count", "--out", str(tmp_path / "c"), "--n", "6"]) == 0
    assert json.loads((tmp_path / "c" / "dataset_info.json").read_text())["counts"]["train"] == 4
    run = subprocess.run([sys.executable, "-m", "data_builders.vsp", "--out", str(tmp_path / "v"), "--n", "4"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "vsp: 100%" in run.stderr
    assert (tmp_path / "v" / "train.jsonl").read_text().count("\n") == 4


# ---------------------------------------------------------------------------------------------------------------------
# Perception captions (the tiny base's pretraining data)


def test_captions_describe_pictures_no_task_builder_draws(tmp_path):
    from data_builders import captions

    assert main(["captions", "--out", str(tmp_path / "c"), "--n", "60", "--seed", "5"]) == 0
    records = [r for s in SPLITS for r in load_records(tmp_path / "c", split=s)]
    assert Counter(r["meta"]["kind"] for r in records) == {"maze": 30, "vsp": 10, "depth": 10, "jigsaw": 10}
    for r in records:
        assert len(r["images"]) == 1 and not latents(r) and "answer is" not in assistant_text(r)
        assert assistant_text(r) == r["answer"]
        kind, meta = r["meta"]["kind"], r["meta"]
        if kind == "maze":  # the maze builder draws spanning trees (or one with a passage cut): acyclic, <= 2 pieces
            n, cells = meta["size"], meta["cells"]
            edges = sum(bin(c).count("1") for c in cells) // 2
            seen, pieces = set(), 0
            for s in range(n * n):
                if s in seen:
                    continue
                pieces, queue = pieces + 1, deque([s])
                seen.add(s)
                while queue:
                    cell = queue.popleft()
                    for bit, step in ((1, -n), (2, n), (4, -1), (8, 1)):
                        if cells[cell] & bit and cell + step not in seen:
                            seen.add(cell + step)
                            queue.append(cell + step)
            assert not (edges == n * n - pieces and pieces <= 2)
            # the caption's row 1 lists row 1's open sides in the order up, down, left, right
            first = ["; ".join(" ".join(w for w, b in (("up", 1), ("down", 2), ("left", 4), ("right", 8)) if c & b)
                               or "closed" for c in cells[:n])]
            assert f"Row 1: {first[0]}." in r["answer"]
        elif kind == "vsp":  # the vsp builder draws round(u * n * n) holes, u in [0.15, 0.35]
            n = len(meta["rows"])
            holes = sum(row.split().count("H") for row in meta["rows"])
            assert not round(0.15 * n * n) <= holes <= round(0.35 * n * n)
            assert "".join(meta["rows"]).count("S") == 1 and "".join(meta["rows"]).count("G") == 1


def test_caption_score_counts_cells_read_right(tmp_path):
    from data_builders import captions

    assert main(["captions", "--out", str(tmp_path / "c"), "--n", "8", "--seed", "1", "--kinds", "maze,vsp"]) == 0
    records = load_records(tmp_path / "c", split="train")
    maze_rec, lake_rec = (next(r for r in records if r["meta"]["kind"] == k) for k in ("maze", "vsp"))
    n = maze_rec["meta"]["size"]
    assert captions.score(maze_rec, maze_rec["answer"]) == (n * n + 2, n * n + 2)  # every cell, start and goal
    wrong = maze_rec["answer"].replace("Row 1: ", "Row 1: up down left right; ", 1)  # shifts row 1 by one cell
    right, total = captions.score(maze_rec, wrong)
    assert total == n * n + 2 and right < total
    m = len(lake_rec["meta"]["rows"])
    assert captions.score(lake_rec, lake_rec["answer"]) == (m * m, m * m)
    first = lake_rec["meta"]["rows"][0].split()
    flipped = lake_rec["answer"].replace(f"Row 1: {' '.join(first)}.",
                                         f"Row 1: {' '.join(['H' if first[0] != 'H' else 'F'] + first[1:])}.")
    assert captions.score(lake_rec, flipped) == (m * m - 1, m * m)
    assert captions.score(lake_rec, "") == (0, m * m)


def test_maze_wall_width_option_draws_the_same_mazes_thicker(tmp_path):
    assert build("maze", tmp_path / "thin", "--size", "4", n=6) == 0
    assert build("maze", tmp_path / "thick", "--size", "4", "--wall", "4", n=6) == 0
    thin, thick = (load_records(tmp_path / k, split="train")[0] for k in ("thin", "thick"))
    assert thin["meta"]["cells"] == thick["meta"]["cells"] and thin["answer"] == thick["answer"]

    def dark(record):  # wall pixels: the wall colour (30, 30, 30)
        return sum(1 for p in Image.open(record["images"][0]).convert("RGB").getdata() if p == (30, 30, 30))

    assert dark(thick) > 1.6 * dark(thin)


def test_vsp_length_option_bounds_the_safe_questions_sequence(tmp_path):
    assert build("vsp", tmp_path / "v", "--size", "4", "--questions", "safe", "--length", "2-3", n=16) == 0
    for r in load_records(tmp_path / "v", split="train"):
        actions = user_text(r).split("Is the action sequence ")[1].split(" safe?")[0].split(",")
        # a failing walk may run on for up to 2 actions after it fails
        assert 2 <= len(actions) <= 3 + 2 and (len(actions) <= 3 or vsp.simulate(r["meta"]["map_desc"],
                                                                               actions[:3]) in ("hole", "off-grid"))


def test_vsp_walk_drawn_leaves_the_walk_to_the_latent_step(tmp_path):
    args = ("--size", "4", "--questions", "safe", "--length", "2-3")
    assert build("vsp", tmp_path / "words", *args, n=12) == 0
    assert build("vsp", tmp_path / "drawn", *args, "--walk", "drawn", n=12) == 0
    for words, drawn in zip(load_records(tmp_path / "words", split="train"), load_records(tmp_path / "drawn",
                                                                                           split="train")):
        assert drawn["meta"] == words["meta"]  # same problem, same text CoT
        parts = drawn["messages"][1]["content"]
        assert [c["type"] for c in parts] == ["text", "latent", "text"]
        assert parts[0]["text"] == f"Let me draw the route {','.join(drawn['meta']['actions'])} on the map."
        assert "row" not in parts[0]["text"] and "row" in assistant_text(words)  # no cell named before the drawing
        assert parts[2]["text"].endswith(f"The answer is {drawn['answer']}.")


def test_depth_marker_option_draws_discs_on_the_points(tmp_path):
    assert build("depth", tmp_path / "d", "--marker", "20", n=8) == 0
    for r in load_records(tmp_path / "d", split="train"):
        image = Image.open(tmp_path / "d" / r["images"][0]).convert("L")
        for label, gray in (("A", 255), ("B", 0)):
            x, y = r["meta"]["points"][label]
            # a ring of the disc (7 px from the point: inside the 10 px radius, outside the letter) is all A's white
            # or all B's black, whatever lies under it
            ring = [image.getpixel((x + dx, y + dy)) for dx, dy in ((7, 0), (-7, 0), (0, 7), (0, -7))]
            assert all(abs(v - gray) < 40 for v in ring), (label, ring)
    assert build("depth", tmp_path / "bad", "--marker", "99", n=8) == 2


@pytest.mark.parametrize("distractors", ["mixed", "foreign"])
def test_jigsaw_separate_layout_shows_each_candidate_as_its_own_image(tmp_path, distractors):
    out = tmp_path / distractors
    assert build("jigsaw", out, "--layout", "separate", "--distractors", distractors, n=12) == 0
    flips = (Image.Transpose.ROTATE_180, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM)
    for r in load_records(out, split="train"):
        assert len(r["images"]) == 6 and latents(r) == [5]
        user = r["messages"][0]["content"]
        assert [c["image"] for c in user if c["type"] == "image"] == [0, 1, 2, 3, 4]
        for i, letter in enumerate("ABCD"):  # each candidate right after its letter
            assert user[2 * i + 1]["text"].endswith(f"{letter}.")
            assert user[2 * i + 2] == {"type": "image", "image": i + 1}
        full = Image.open(r["images"][5]).convert("RGB")
        side = full.width // r["meta"]["grid"]
        row, col = r["meta"]["missing"]
        right = full.crop((col * side, row * side, (col + 1) * side, (row + 1) * side))
        tiles = [Image.open(p).convert("RGB") for p in r["images"][1:5]]
        same = [list(t.getdata()) == list(right.getdata()) for t in tiles]
        assert same == [letter == r["answer"] for letter in "ABCD"]  # the answer's image is the missing tile
        turned = sum(any(list(t.getdata()) == list(right.transpose(f).getdata()) for f in flips)
                     for t, s in zip(tiles, same) if not s)
        assert turned == (1 if distractors == "mixed" else 0)  # foreign: no candidate is the right tile turned


def test_jigsaw_inplace_layout_pastes_each_candidate_into_the_gap(tmp_path):
    assert build("jigsaw", tmp_path / "j", "--layout", "inplace", n=12) == 0
    for r in load_records(tmp_path / "j", split="train"):
        holed, *options, full = [Image.open(p).convert("RGB") for p in r["images"]]
        side = full.width // r["meta"]["grid"]
        row, col = r["meta"]["missing"]
        gap = (col * side, row * side, (col + 1) * side, (row + 1) * side)
        for letter, option in zip("ABCD", options):
            outside = [(x, y) for x in range(full.width) for y in range(full.height)
                       if not (gap[0] <= x < gap[2] and gap[1] <= y < gap[3])][::37]
            assert all(option.getpixel(xy) == holed.getpixel(xy) for xy in outside)  # the picture around the gap
            assert (list(option.getdata()) == list(full.getdata())) == (letter == r["answer"])  # only the answer fits


def test_jigsaw_fits_question_pastes_one_candidate_and_asks_whether_it_fits(tmp_path):
    assert build("jigsaw", tmp_path / "j", "--question", "fits", n=24) == 0
    answers = Counter()
    for r in load_records(tmp_path / "j", split="train"):
        shown, full = [Image.open(p).convert("RGB") for p in r["images"]]
        assert latents(r) == [1] and r["meta"]["question_type"] == "fits"
        side = full.width // r["meta"]["grid"]
        row, col = r["meta"]["missing"]
        gap = (col * side, row * side, (col + 1) * side, (row + 1) * side)
        inside = {(x, y) for x in range(gap[0], gap[2]) for y in range(gap[1], gap[3])}
        differs = sum(shown.getpixel(xy) != full.getpixel(xy) for xy in inside)
        same_outside = all(shown.getpixel((x, y)) == full.getpixel((x, y)) for x in range(0, full.width, 5)
                           for y in range(0, full.height, 5) if (x, y) not in inside)
        assert same_outside and (differs == 0) == (r["answer"] == "yes")  # yes: the picture is whole again
        assert (r["meta"]["candidate"] == "right") == (r["answer"] == "yes")
        cot = r["meta"]["text_cot"]  # each side with a neighbour (two in a 2x2 grid) judged in words, then the verdict
        named = [side for side in ("top", "bottom", "left", "right") if f"its {side} edge" in cot]
        assert named == [("top", "bottom")[row == 0], ("left", "right")[col == 0]]
        assert ("So it fits" in cot) == (r["answer"] == "yes") and cot.endswith(f"The answer is {r['answer']}.")
        answers[r["answer"]] += 1
    assert answers["yes"] == answers["no"]


def test_route_captions_name_the_cells_the_drawn_line_covers(tmp_path):
    """The opt-in route kinds: a line along open passages of a maze, or a walk from S on a lake drawn as vsp draws it;
    the caption names the covered cells in reading order (recomputed here from the route), the cross where the walk
    fails, and the line is in the picture exactly at the covered cells' centres."""
    from PIL import Image

    from data_builders import captions, maze

    assert main(["captions", "--out", str(tmp_path / "c"), "--n", "30", "--seed", "2",
                 "--kinds", "maze_route,lake_route"]) == 0
    records = load_records(tmp_path / "c", split="train")
    assert Counter(r["meta"]["kind"] for r in records) == {"maze_route": 12, "lake_route": 12}
    step = {(-1, 0): 1, (1, 0): 2, (0, -1): 4, (0, 1): 8}  # the maze's open-side bit for a move
    for r in records:
        route = [tuple(x) for x in r["meta"]["route"]]
        if r["meta"]["kind"] == "maze_route":
            n, cells = r["meta"]["size"], r["meta"]["cells"]
            assert len(set(route)) == len(route) > 1
            for (r0, c0), (r1, c1) in zip(route, route[1:]):  # each move goes through an open passage
                assert cells[r0 * n + c0] & step[(r1 - r0, c1 - c0)]
            image, cell, pad = Image.open(tmp_path / "c" / r["images"][0]), 160 // n, 8
            on_line = {(i, j) for i in range(n) for j in range(n)
                       if image.getpixel((pad + j * cell + cell // 2, pad + i * cell + cell // 2)) == maze.ROUTE}
            assert on_line == set(route)
            tail = ""
        else:
            rows = [row.split() for row in r["meta"]["rows"]]
            n = len(rows)
            assert rows[route[0][0]][route[0][1]] == "S"
            assert all(abs(r1 - r0) + abs(c1 - c0) == 1 for (r0, c0), (r1, c1) in zip(route, route[1:]))
            inside = [(i, j) for i, j in route if 0 <= i < n and 0 <= j < n]
            last = route[-1]
            off = len(inside) < len(route)
            fell = off or rows[last[0]][last[1]] == "H"
            assert all(rows[i][j] not in "HG" for i, j in inside[:-1])  # the walk stops at the first hole or goal
            tail = (" It leaves the grid." if off else "") + (" It ends with a cross." if fell else "")
        covered = sorted({(i, j) for i, j in route if 0 <= i < n and 0 <= j < n})
        assert r["answer"] == ("The drawn route covers " + "; ".join(f"row {i + 1}, column {j + 1}" for i, j in covered)
                               + "." + tail)
        units = len(covered) + tail.count(".")
        assert captions.score(r, r["answer"]) == (units, units)
        dropped = r["answer"].replace(f"row {covered[0][0] + 1}, column {covered[0][1] + 1}; ", "", 1)
        if dropped != r["answer"]:
            assert captions.score(r, dropped) == (units - 1, units)
    assert any("cross" in r["answer"] for r in records) and any("cross" not in r["answer"] for r in records)
