"""Trace checks (`vlatent.analysis.trace`): which cell sentence of a written reasoning trace is right."""

import json

import pytest

from data_builders import maze, vsp
from vlatent.analysis import check_trace, trace_scores
from vlatent.generation import LATENT_MARKER

REF = ("Start at row 1, column 3. D goes down to row 2, column 3: ice. D goes down to row 3, column 3: the goal. "
       "The sequence reaches the goal without touching a hole, so it is safe. The answer is yes.")


@pytest.mark.parametrize("output, start, steps_right, exact", [
    (REF, True, 2, True),
    # an off-by-one start column, the steps still right
    (REF.replace("Start at row 1, column 3", "Start at row 1, column 2"), False, 2, False),
    # the first step walks the wrong way (row 1 instead of row 2)
    (REF.replace("to row 2, column 3", "to row 1, column 3"), True, 1, False),
    # stops a step short
    ("Start at row 1, column 3. D goes down to row 2, column 3: ice. The answer is no.", True, 1, False),
    # one step too many
    (REF.replace("the goal.", "the goal. D goes down to row 4, column 3: ice."), True, 2, False),
    # the right walk with a different verdict is still the right walk
    (REF.replace("so it is safe. The answer is yes", "so it is not safe. The answer is no"), True, 2, True),
    ("", False, 0, False),
])
def test_check_trace_against_hand_marked_outputs(output, start, steps_right, exact):
    check = check_trace(REF, output)
    assert (check.start, check.steps_right, check.steps, check.exact) == (start, steps_right, 2, exact)


def test_latent_segments_end_a_sentence():
    marker = LATENT_MARKER.format(k=4)
    output = ("Let me walk this sequence on the map. Start at row 1, column 3. D goes down to row 2, column 3: ice."
              f"{marker}D goes down to row 3, column 3: the goal.{marker}The drawn route reaches the goal.")
    assert check_trace(REF, output).exact


def test_nothing_to_check_without_cells():
    assert check_trace("The answer is yes.", "Start at row 1, column 1.") is None
    assert trace_scores({"a": "The answer is yes."}, [{"id": "a", "output": "x"}]) is None


def test_trace_scores_hand_numbers():
    refs = {"a": REF, "b": REF}
    preds = [{"id": "a", "output": REF},  # start right, 2 of 2 steps, exact
             {"id": "b", "output": REF.replace("column 3. D", "column 4. D", 1).replace("to row 3", "to row 4")},
             {"id": "unknown", "output": REF}]  # no reference: not counted
    # b: start wrong, step 1 right, step 2 wrong
    assert trace_scores(refs, preds) == {"start": 0.5, "steps": 3 / 4, "exact": 0.5, "n": 2}


@pytest.mark.parametrize("builder, args", [(vsp, ["--questions", "safe", "--length", "2-3"]),
                                           (maze, ["--questions", "first_move"])])
def test_latent_records_walk_as_the_text_trace_does(tmp_path, builder, args):
    """The latent records' words (latent steps as the generation shows them) reproduce ``meta.text_cot``'s walk."""
    out = tmp_path / "data"
    assert builder.main(["--out", str(out), "--n", "12", "--seed", "3", "--split", "1,0,0", *args]) == 0
    records = [json.loads(line) for line in (out / "train.jsonl").open()]
    for r in records:
        words = "".join(part["text"] + " " if part["type"] == "text" else LATENT_MARKER.format(k=4)
                        for part in r["messages"][-1]["content"])
        assert check_trace(r["meta"]["text_cot"], words).exact, r["id"]
    assert sum(check_trace(r["meta"]["text_cot"], "").steps for r in records) >= len(records)  # walks, not starts
