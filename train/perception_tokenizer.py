"""Train the depth-map VQ-VAE behind perception tokens (Aurora) on the helper images of interleaved records.

    python train/perception_tokenizer.py --data data/depth/train.jsonl --eval data/depth/val.jsonl \
        --out runs/depth_tokenizer [--steps 500] [--image-size 80] [--codebook-size 128]

Every image a record shows as a latent step (``{"type": "latent", "image": j}``: the depth builder's depth maps) is
a training map. Loss = L1 reconstruction + ``--edge-weight`` x L1 of the maps' horizontal and vertical differences
(objects are small: without it the decoder learns the ground plane first and objects late) + the VQ loss (codebook +
0.25 * commitment, diffusers' ``VectorQuantizer``); the codebook starts from
encoder outputs and codes left unused for ``--restart-every`` steps restart at random encoder outputs (against
codebook collapse; AiT / Aurora train longer on GPUs instead). The held-out maps' reconstruction error (MAE in gray
levels, PSNR) and, where records mark two points (``meta.points``, the depth builder), how often the reconstructed
map still orders them as the answer says, are printed and written to ``OUT/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vlatent.data import RecordError, load_records
from vlatent.decoders.depth import DepthTokenizer, DepthTokenizerConfig, depth_reconstruction_error


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="training records (.jsonl) whose latent steps show depth maps")
    ap.add_argument("--eval", help="held-out records (.jsonl) for the reconstruction figures")
    ap.add_argument("--out", required=True, help="where the tokenizer directory is written")
    ap.add_argument("--image-size", type=int, default=80)
    ap.add_argument("--codebook-size", type=int, default=128)
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 16, 32, 32],
                    help="block widths; len - 1 downsamplings (80 px and 4 blocks: 10 x 10 = 100 codes)")
    ap.add_argument("--latent-channels", type=int, default=16)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--edge-weight", type=float, default=2.0,
                    help="weight of the L1 loss on horizontal / vertical differences (object boundaries)")
    ap.add_argument("--restart-every", type=int, default=50, help="steps between dead-code restarts (0: never)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    return ap.parse_args(argv)


def helper_maps(records: list[dict]) -> list[tuple[dict, str]]:
    """(record, image path) of every image shown as a latent step."""
    return [(r, r["images"][item["image"]]) for r in records for m in r["messages"] for item in m["content"]
            if item["type"] == "latent"]


def open_maps(pairs) -> list[Image.Image]:
    out = []
    for record, path in pairs:
        try:
            with Image.open(path) as im:
                out.append(im.convert("L"))
        except OSError as e:
            raise RecordError(f"record {record['id']!r}: cannot read depth map {path!r} ({e})") from e
    return out


@torch.no_grad()
def restart_dead_codes(tokenizer: DepthTokenizer, used: torch.Tensor, latents: torch.Tensor, gen) -> int:
    """Move codes not used since the last restart onto random current encoder outputs; returns how many moved."""
    dead = (~used).nonzero().flatten()
    if dead.numel():
        vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        pick = torch.randint(len(vectors), (dead.numel(),), generator=gen)
        tokenizer.vq.quantize.embedding.weight[dead] = vectors[pick]
    return int(dead.numel())


@torch.no_grad()
def point_order_accuracy(tokenizer: DepthTokenizer, pairs, maps: list[Image.Image]) -> float | None:
    """Share of records with two marked points (A, B) whose reconstructed depth map makes the answer the brighter
    (nearer) point; None when no record marks points."""
    hits = total = 0
    recon = tokenizer.decode(tokenizer.encode(maps))
    for (record, _), original, rec in zip(pairs, maps, recon):
        points = record.get("meta", {}).get("points")
        if not points or record.get("answer") not in ("A", "B"):
            continue
        full = F.interpolate(rec[None], size=original.size[::-1], mode="bilinear", align_corners=False)[0, 0]
        a, b = (full[y, x].item() for x, y in (points["A"], points["B"]))
        hits += ("A" if a > b else "B") == record["answer"]
        total += 1
    return hits / total if total else None


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    try:
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise FileExistsError(f"--out {str(out)!r} is not empty: pass --overwrite to replace it")
        config = DepthTokenizerConfig(image_size=args.image_size, codebook_size=args.codebook_size,
                                      block_out_channels=tuple(args.channels), latent_channels=args.latent_channels,
                                      norm_num_groups=min(8, *args.channels))
        train_pairs = helper_maps(load_records(args.data))
        eval_pairs = helper_maps(load_records(args.eval)) if args.eval else []
        if not train_pairs:
            raise RecordError(f"{args.data!r}: no record shows an image as a latent step; nothing to train on")
        train_maps = open_maps(train_pairs)
        eval_maps = open_maps(eval_pairs)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tokenizer = DepthTokenizer(config)
    data = tokenizer.to_tensor(train_maps)  # (n, 1, S, S)
    print(f"{len(train_maps)} training maps, {len(eval_maps)} held out; {config.num_codes} codes per map from a "
          f"codebook of {config.codebook_size}")
    with torch.no_grad():  # the codebook starts on encoder outputs
        latents = tokenizer.vq.encode(data[torch.randperm(len(data), generator=gen)[:64]]).latents
        restart_dead_codes(tokenizer, torch.zeros(config.codebook_size, dtype=torch.bool), latents, gen)

    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps, eta_min=args.lr / 20)
    used = torch.zeros(config.codebook_size, dtype=torch.bool)
    start = time.time()
    tokenizer.train()
    for step in range(1, args.steps + 1):
        batch = data[torch.randint(len(data), (args.batch_size,), generator=gen)]
        flip = torch.rand(len(batch), generator=gen) < 0.5  # mirror images are depth maps too
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        latents = tokenizer.vq.encode(batch).latents
        quant, vq_loss, (_, _, indices) = tokenizer.vq.quantize(latents)
        recon = tokenizer.vq.decode(quant, force_not_quantize=True).sample
        rec_loss = F.l1_loss(recon, batch)
        edge_loss = sum(F.l1_loss(recon.diff(dim=d), batch.diff(dim=d)) for d in (-1, -2))
        loss = rec_loss + args.edge_weight * edge_loss + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        used[indices.flatten()] = True
        if args.restart_every and step % args.restart_every == 0 and step < 0.8 * args.steps:
            moved = restart_dead_codes(tokenizer, used, latents.detach(), gen)
            used[:] = False
        else:
            moved = 0
        if step % 100 == 0 or step == 1:
            print(f"step {step}: L1 {rec_loss.item():.4f}  edges {edge_loss.item():.4f}  vq {vq_loss.item():.4f}"
                  + (f"  restarted {moved} codes" if moved else "") + f"  ({time.time() - start:.0f}s)", flush=True)
    tokenizer.eval()

    metrics = {"train_maps": len(train_maps), "steps": args.steps, "seconds": round(time.time() - start, 1),
               "codes_per_map": config.num_codes, "codebook_size": config.codebook_size}
    with torch.no_grad():
        metrics["codebook_used"] = int(tokenizer.encode(data).unique().numel())
    if eval_maps:
        metrics.update(heldout_maps=len(eval_maps), **depth_reconstruction_error(tokenizer, eval_maps))
        order = point_order_accuracy(tokenizer, eval_pairs, eval_maps)
        if order is not None:
            metrics["point_order_accuracy"] = order
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
