"""Does a Sketchpad model's vision head draw each example's own sketch? The first test records of a data folder,
collated as in training, the true sketches teacher-forced in their slots: the head's sketch for each slot segment
(what stage 2 regresses) against that example's true helper image, another example's at the same step, and the mean
helper image, in the head's space (L1 per feature, and cosine after the mean sketch is taken off both).

    python bench/sketch_specificity.py --model runs/l/runs/sketchpad/maze/seed0/lr0.001/stage1 --data runs/l/data/maze
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
    args = ap.parse_args()

    model = LatentVLM.from_pretrained(args.model).eval()
    method, backbone = model.method, model.backbone
    if method.name != "sketchpad":
        raise SystemExit(f"error: {args.model} is a {method.name!r} model; this reads a Sketchpad vision head")
    k = method.config.num_latent_tokens
    records = load_records(Path(args.data) / "test.jsonl")[: args.n]
    drawn, true, where = [], [], []  # per sketch: the head's, the true one (head space), (record, step)
    with torch.no_grad():
        for first in range(0, len(records), 16):
            batch = model.collator()(records[first:first + 16])
            b, t = model.latent_slots(batch)
            targets, _ = method.sketch_targets(model, batch)
            embeds = model.embed_inputs(batch).index_put(
                (b, t), backbone.project_vision_features(torch.cat(targets)).to(model.dtype))
            hidden = model.run_language_model(embeds, batch).last_hidden_state
            images, _ = method.vit_features(model, batch["pixel_values"], batch["image_grid_thw"])
            out, space = method.head_sketches(model, batch, hidden, targets, images)
            drawn += list(method.head_space(backbone, out))
            true += space
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

    print(json.dumps({"sketches": len(where), "l1_own": l1(drawn, true), "l1_other": l1(drawn, true[other]),
                      "l1_mean_sketch": l1(mean.expand_as(true), true), "l1_true_other": l1(true, true[other]),
                      "centred_cos_own": centred_cos(drawn, true),
                      "centred_cos_other": centred_cos(drawn, true[other])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
