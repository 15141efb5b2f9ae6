"""Latent specificity (`vlatent.analysis.latent_specificity`): do different examples get different latents, and
their own targets' ones? Hand-made unit vectors, so every cosine is 0 or 1 and the expected means are counted."""

import pytest
import torch

from vlatent.analysis import latent_specificity

E1, E2, E3 = torch.eye(3)


def test_specificity_counts_same_step_pairs_of_different_examples():
    # example 0 takes e1 then e2, example 1 e1 then e3 (scaled: cosines ignore the norm)
    latents = torch.stack([E1, E2, 2 * E1, 5 * E3])
    rows, index = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    targets = torch.stack([E1, E2, E2, E3])  # example 1's first latent points at example 0's first target
    got = latent_specificity(latents, rows, index, targets)
    # same step, other example: (e1, e1) twice -> 1, (e2, e3) twice -> 0; pairing across steps would give 0.25
    assert got.across == pytest.approx(0.5)
    assert got.own == pytest.approx(3 / 4)  # 1, 1, 0, 1
    assert got.other == pytest.approx(1 / 4)  # 0, 0, 1, 0
    assert got.retrieval == pytest.approx(3 / 4)  # all but example 1's first latent pick their own target
    assert got.chance == pytest.approx(1 / 2)  # one other example at each step


def test_identical_latents_are_fully_alike_and_without_targets_only_that_is_measured():
    got = latent_specificity(torch.ones(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert got.across == pytest.approx(1.0)
    assert got.own is got.retrieval is None


def test_generated_specificity_takes_each_runs_latents_in_order_across_its_segments():
    from vlatent.analysis import generated_specificity
    from vlatent.generation import Generation, LatentSegment, TextSegment

    def run(*segments):
        return Generation([TextSegment("x", [1])] + [LatentSegment(torch.stack(z)) for z in segments])

    # example 0 feeds e1 then (a second segment) e2; example 1 e1 then e3; a text-only run is left out
    runs = [run([E1], [E2]), Generation([TextSegment("no latents", [1])]), run([3 * E1, E3])]
    assert generated_specificity(runs).across == pytest.approx(0.5)  # step 0: (e1, e1); step 1: (e2, e3)
    assert generated_specificity(runs[:2]) is None  # one example with latents: nothing to compare


def test_specificity_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="at least two examples"):
        latent_specificity(torch.ones(2, 4), torch.tensor([0, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="3 latents but 2 rows"):
        latent_specificity(torch.ones(3, 4), torch.tensor([0, 1]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="targets"):
        latent_specificity(torch.ones(2, 4), torch.tensor([0, 1]), torch.tensor([0, 0]), torch.ones(2, 3))


def test_bench_script_pairs_each_helper_with_its_own_question_picture(tiny_base, tmp_path):
    """bench/latent_specificity.py on a tiny Mirage model and a few vsp records: a route image differs from its own
    map by a drawn line only, so it must sit nearer its own question picture than another example's (pairing a
    helper with the wrong row would make the two distances alike)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from vlatent.model import LatentVLM

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    import learning

    data = learning.build_task("vsp", tmp_path, n=40)  # 4 test records
    model = tmp_path / "mirage"
    LatentVLM.from_pretrained(tiny_base, method="mirage").save_pretrained(model)
    out = subprocess.run([sys.executable, str(root / "bench" / "latent_specificity.py"), "--model", str(model),
                          "--data", str(data), "--n", "4", "--verdict", "falls,walks,reaches,stays"],
                         capture_output=True, text=True, check=True, timeout=300)
    assert "4 examples, 16 latents (own)" in out.stdout and "alike (cos between examples" in out.stdout
    own, other = map(float, re.search(r"picture's \(mean distance per token\): ([\d.]+); from another example's: "
                                      r"([\d.]+) \(4 helpers\)", out.stdout).groups())
    assert own < other / 2
    # every vsp record says "The drawn route <verdict>" after its latents: all 4 are scored, both ways
    true, swapped = map(float, re.search(r"true targets ([\d.]+), the previous segment's ([\d.]+) \(4 records\)",
                                         out.stdout).groups())
    assert {true * 4, swapped * 4} <= {0.0, 1.0, 2.0, 3.0, 4.0}

    out = subprocess.run([sys.executable, str(root / "bench" / "latent_specificity.py"), "--model", str(model),
                          "--data", str(data), "--n", "4", "--generated", "--max-new-tokens", "6"],
                         capture_output=True, text=True, check=True, timeout=300)
    assert "(mirage, vsp): 4 answers, " in out.stdout and "alike (cos between examples, same step): " in out.stdout
