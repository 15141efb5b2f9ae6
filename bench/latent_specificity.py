"""Do a Mirage model's latents carry their example? The first test records of a data folder, collated as in training:
each latent a model feeds (its own, recurrently, as in stage 2; or with ``--teacher-forced`` the state before each
slot with the true targets in place, as stage 1 trains it) against the pooled helper-image targets of every example
(`vlatent.analysis.latent_specificity`). Also how far each helper image's embedding (the frozen vision tower's, what
the targets pool) lies from its own question picture's against another example's: a helper the tower sees as its
question picture gives the latents nothing the picture in context does not.

With ``--generated`` (any latent method): only how alike the latents are that the model feeds itself while answering
the test questions (`generate`, as the bench's swap intervention runs it).

    python bench/latent_specificity.py --model runs/l/runs/mirage/vsp/seed0/lr0.001/stage0 --data runs/l/data/vsp
    python bench/latent_specificity.py --model runs/l/runs/monet/vsp/seed0/lr0.001/stage2 --data runs/l/data/vsp \
        --generated --max-new-tokens 176
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from vlatent.analysis import latent_specificity
    from vlatent.data import load_records
    from vlatent.methods.mirage import pool_to_k
    from vlatent.model import LatentVLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a Mirage checkpoint (either stage; any latent method with "
                                                   "--generated)")
    ap.add_argument("--data", required=True, help="a data_builders folder with test.jsonl")
    ap.add_argument("--n", type=int, default=96, help="test records to use (default 96)")
    ap.add_argument("--teacher-forced", action="store_true", help="the state before each slot, true targets fed")
    ap.add_argument("--verdict", metavar="WORD,WORD,...",
                    help="also, teacher-forced with the true targets and with the previous segment's in their place: "
                         "how often the model's pick among these words, where the record's answer first has one "
                         "of them, is the record's (e.g. falls,walks,reaches,stays for vsp's drawn route)")
    ap.add_argument("--generated", action="store_true", help="the latents of generated answers, any latent method")
    ap.add_argument("--max-new-tokens", type=int, default=176, help="with --generated (default 176: a vsp answer)")
    args = ap.parse_args()
    model = LatentVLM.from_pretrained(args.model).eval()
    if args.generated:
        return generated(model, args)
    if model.method.name != "mirage":
        raise SystemExit(f"error: {args.model} is a {model.method.name!r} model; the targets here are Mirage's")
    records = load_records(Path(args.data) / "test.jsonl")[: args.n]
    collate, k = model.collator(), model.method.config.num_latent_tokens
    words = args.verdict.split(",") if args.verdict else []
    candidates = [model.tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in words]
    if len(set(candidates)) < len(words):
        raise SystemExit(f"error: --verdict words must start with different tokens: {words}")
    latents, targets, rows, own, other = [], [], [], [], []
    picked = {"true": 0, "swapped": 0, "scored": 0}
    with torch.no_grad():
        for a in range(0, len(records), 16):
            batch = collate(records[a:a + 16])
            helpers = model.latent_targets(batch)  # per segment (tokens, hidden)
            target = torch.cat([pool_to_k(t, k) for t in helpers])  # (segments * k, hidden)
            pictures = model.backbone.encode_images(batch["pixel_values"], batch["image_grid_thw"])  # per row
            seg_rows = model.latent_slots(batch)[0][::k].tolist()  # each segment's row
            for s, r in enumerate(seg_rows):  # one question picture per record; the next record's as "another"
                if len(pictures) > 1 and helpers[s].shape == pictures[r].shape:
                    own.append((helpers[s] - pictures[r]).norm(dim=-1).mean().item())
                    other.append((helpers[s] - pictures[(r + 1) % len(pictures)]).norm(dim=-1).mean().item())
            embeds = model.embed_inputs(batch)
            if candidates:
                verdicts(model, batch, embeds, target, candidates, picked)
            if args.teacher_forced:
                b, t = model.latent_slots(batch)
                hidden = model.run_language_model(embeds.index_put((b, t), target.to(embeds.dtype)), batch)
                latents.append(hidden.last_hidden_state[b, t - 1])
            else:
                embeds, _, (b, t) = model.fill_latents(embeds, batch, model.position_ids(batch),
                                                       batch["attention_mask"])
                latents.append(embeds[b, t])
            targets.append(target)
            rows.append(b + a)
    latents, rows = torch.cat(latents), torch.cat(rows)
    # each latent's step within its example (the latents come row-major: one run of each row)
    index = torch.cat([torch.arange(n) for n in torch.unique_consecutive(rows, return_counts=True)[1].tolist()])
    got = latent_specificity(latents, rows, index, torch.cat(targets))
    how = "teacher-forced" if args.teacher_forced else "own"
    print(f"{args.model}: {len(records)} examples, {len(rows)} latents ({how})")
    print(f"  alike (cos between examples, same slot): {got.across:.4f}")
    print(f"  cos to own target {got.own:.4f}, to another example's {got.other:.4f}")
    print(f"  own target nearest: {got.retrieval:.3f} (chance {got.chance:.3f})")
    if own:
        print("  helper-image embedding from its question picture's (mean distance per token): "
              f"{sum(own) / len(own):.2f}; from another example's: {sum(other) / len(other):.2f} ({len(own)} helpers)")
    if picked["scored"]:
        print(f"  verdict word right, teacher-forced: true targets {picked['true'] / picked['scored']:.3f}, the "
              f"previous segment's {picked['swapped'] / picked['scored']:.3f} ({picked['scored']} records)")
    return 0


def generated(model, args) -> int:
    """How alike the latents are that the model generates answering the first ``--n`` test questions."""
    from eval.benchmarks import get_benchmark, load_examples
    from vlatent.analysis import generated_specificity
    from vlatent.data import load_records

    if not model.method.uses_latents:
        raise SystemExit(f"error: {args.model} is a {model.method.name!r} model, without latents")
    task = load_records(Path(args.data) / "test.jsonl")[0]["task"]
    examples = [ex for ex in load_examples(get_benchmark(task), args.data, "test") if ex.error is None][: args.n]
    runs = [g for a in range(0, len(examples), 16) for g in model.generate(
        [ex.open_images() for ex in examples[a:a + 16]], [ex.prompt for ex in examples[a:a + 16]],
        max_new_tokens=args.max_new_tokens)]
    got = generated_specificity(runs)
    with_latents = sum(bool(g.latent_segments) for g in runs)
    print(f"{args.model} ({model.method.name}, {task}): {len(runs)} answers, {with_latents} with latents")
    print("  alike (cos between examples, same step): " + ("—" if got is None else f"{got.across:.4f}"))
    return 0


def verdicts(model, batch, embeds, target, candidates: list[int], picked: dict) -> None:
    """Count, per record with a verdict word in its labels, whether the model picks it (among ``candidates``) with
    the true targets at the latent slots and with the previous segment's."""
    k = model.method.config.num_latent_tokens
    b, t = model.latent_slots(batch)
    labels = batch["labels"].tolist()
    first = [next((p for p, x in enumerate(row) if x in candidates), None) for row in labels]
    donor = target.view(-1, k, target.shape[-1]).roll(1, 0).reshape(target.shape)  # segment s gets s - 1's
    for name, fed in (("true", target), ("swapped", donor)):
        hidden = model.run_language_model(embeds.index_put((b, t), fed.to(embeds.dtype)), batch).last_hidden_state
        for r, p in enumerate(first):
            if p is not None:  # the state before position p predicts its label
                logits = model.backbone.logits(hidden[r, p - 1][None])[0, candidates]
                picked[name] += int(candidates[int(logits.argmax())] == labels[r][p])
    picked["scored"] += sum(p is not None for p in first)


if __name__ == "__main__":
    sys.exit(main())
