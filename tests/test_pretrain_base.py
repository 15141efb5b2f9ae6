"""The tiny base that sees: the shipped copy loads as a plain HF base and reads pictures it never saw; the
pretraining command runs end to end and is deterministic for a seed."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_builders import captions  # noqa: E402
from vlatent.data import load_records  # noqa: E402
from vlatent.model import LatentVLM  # noqa: E402
from vlatent.testing import SHIPPED_BASE, pretrained_base  # noqa: E402


def test_shipped_base_is_recorded_and_is_what_pretrained_base_returns():
    info = json.loads((SHIPPED_BASE / "vlatent_base.json").read_text())
    assert info["command"].startswith("vlatent pretrain-base") and isinstance(info["seed"], int)
    assert len(info["commit"]) == 40 and min(info["perception_accuracy"].values()) > 0
    assert not (SHIPPED_BASE / "vlatent_config.json").exists(), "a plain HF base, not a vlatent checkpoint"
    assert sum(p.stat().st_size for p in SHIPPED_BASE.iterdir()) < 20 * 2**20
    assert pretrained_base() == SHIPPED_BASE


def test_shipped_base_reads_unseen_mazes_and_lakes_cell_by_cell(tmp_path):
    """Pictures drawn now with a seed pretraining never used: most cells must be read back right (a base that has not
    learned to see walls writes its caption prior, "all sides open", and reads 0.2-0.3 of maze cells)."""
    assert captions.main(["--out", str(tmp_path / "c"), "--n", "12", "--seed", "424242", "--kinds", "maze,vsp",
                          "--size", "4", "--split", "0,0,1"]) == 0
    records = load_records(tmp_path / "c", split="test")
    model = LatentVLM.from_pretrained(SHIPPED_BASE, method="text").eval()
    gens = model.generate([[Image.open(r["images"][0])] for r in records],
                          [r["messages"][0]["content"][-1]["text"] for r in records], max_new_tokens=160)
    right = total = 0
    for r, g in zip(records, gens):
        ok, n = captions.score(r, g.text)
        right, total = right + ok, total + n
    mazes = sum(r["meta"]["kind"] == "maze" for r in records)
    assert total == mazes * (16 + 2) + (len(records) - mazes) * 16  # 4x4: every cell, plus a maze's start and goal
    assert right / total >= 0.9, [g.text for g in gens[:2]]


@pytest.mark.slow
def test_pretrain_base_end_to_end_and_deterministic(tmp_path):
    from train.pretrain_base import main

    for name in ("a", "b"):
        assert main(["--out", str(tmp_path / name), "--steps", "3", "--batch", "4", "--n", "40",
                     "--held-out", "2"]) == 0
    info = json.loads((tmp_path / "a" / "vlatent_base.json").read_text())
    assert info["steps"] == 3 and set(info["perception_accuracy"]) <= set(captions.KINDS)
    assert (tmp_path / "a" / "loss_curve.png").is_file() and not (tmp_path / "a" / "vlatent_config.json").exists()
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    init = load_file(tmp_path / "a" / "run" / "init" / "model.safetensors")
    assert any((a[k] != init[k]).any() for k in a), "training changed the weights"
    model = LatentVLM.from_pretrained(tmp_path / "a", method="mirage")  # loads like any base VLM
    assert model.method.name == "mirage"
    assert main(["--out", str(tmp_path / "a")]) == 2  # never overwrites a base unless told

    # --init continues a base (here "a", on route captions, another seed): two Adam steps at lr 2e-3 move no weight
    # by more than ~0.004, while random weights of seed 1 lie ~0.1 away from "a"
    assert main(["--out", str(tmp_path / "c"), "--init", str(tmp_path / "a"), "--kinds", "maze_route,lake_route",
                 "--seed", "1", "--steps", "2", "--batch", "4", "--n", "20", "--held-out", "2"]) == 0
    info = json.loads((tmp_path / "c" / "vlatent_base.json").read_text())
    assert info["init"] == str(tmp_path / "a") and set(info["perception_accuracy"]) <= {"maze_route", "lake_route"}
    assert not (tmp_path / "c" / "run" / "init").exists()
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert 0 < max((c[k].float() - a[k].float()).abs().max().item() for k in a) < 0.01
