"""Does a Sketchpad model's vision head draw each example's own sketch? The first test records of a data folder,
collated as in training, the true sketches teacher-forced in their slots: the head's sketch for each slot segment
(what stage 2 regresses) against that example's true helper image, another example's at the same step, and the mean
helper image, in the head's space (L1 per feature, and cosine after the mean sketch is taken off both).

    python bench/sketch_specificity.py --model runs/l/runs/sketchpad/maze/seed0/lr0.001/stage1 --data runs/l/data/maze

``--decoder DIR`` (a sketch decoder for the model's ViT, e.g. the bench's ``sketches/decoder``) also decodes the head's
sketches and scores them as the bench scores generated ones (path IoU against the own / next example's helper image).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from vlatent.data import load_records
    from vlatent.model import LatentVLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a Sketchpad checkpoint (either stage)")
    ap.add_argument("--data", required=True, help="a data_builders folder with test.jsonl")
    ap.add_argument("--n", type=int, default=64, help="test records to use (default 64)")
    ap.add_argument("--decoder", help="a sketch decoder for this model's ViT (the bench's sketches/decoder): also "
                    "decode the head's sketches and score them against the true helper images (path IoU)")
    args = ap.parse_args()

    model = LatentVLM.from_pretrained(args.model).eval()
    method = model.method
    if method.name != "sketchpad":
        raise SystemExit(f"error: {args.model} is a {method.name!r} model; this reads a Sketchpad vision head")
    k = method.config.num_latent_tokens
    records = load_records(Path(args.data) / "test.jsonl")[: args.n]
    drawn, true, where = [], [], []  # per sketch: the head's, the true one (head space), (record, step)
    with torch.no_grad():
        for first in range(0, len(records), 16):
            batch = model.collator()(records[first:first + 16])
            b, _ = model.latent_slots(batch)
            mine, theirs = method.teacher_forced_sketches(model, batch)
            drawn += list(mine)
            true += list(theirs)
            steps: dict[int, int] = {}
            for row in b.view(-1, k)[:, 0].tolist():
                steps[row] = steps.get(row, -1) + 1
                where.append((first + row, steps[row]))
    drawn, true = torch.stack(drawn).float(), torch.stack(true).float()  # (sketches, K * per, d_v)
    other = list(range(len(where)))  # the next example's sketch at the same step (cyclically)
    for step in {s for _, s in where}:
        same = [i for i, (_, s) in enumerate(where) if s == step]
        for i, j in zip(same, same[1:] + same[:1]):
            other[i] = j
    mean = true.mean(0, keepdim=True)

    def l1(a, b):
        return round((a - b).abs().mean().item(), 4)

    def centred_cos(a, b):
        return round(F.cosine_similarity((a - mean).flatten(1), (b - mean).flatten(1)).mean().item(), 4)

    result = {"sketches": len(where), "l1_own": l1(drawn, true), "l1_other": l1(drawn, true[other]),
              "l1_mean_sketch": l1(mean.expand_as(true), true), "l1_true_other": l1(true, true[other]),
              "centred_cos_own": centred_cos(drawn, true), "centred_cos_other": centred_cos(drawn, true[other])}
    if args.decoder:  # the teacher-forced sketches decoded, scored as the bench scores generated ones
        from learning import teacher_forced_scores
        from vlatent.decoders import load_decoder

        colour = json.loads((Path(args.decoder) / "metrics.json").read_text())["args"].get("path_color")
        result["decoded"] = teacher_forced_scores(model, load_decoder(args.decoder), records,
                                                  tuple(map(int, colour.split(","))) if colour else None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
