"""Train Latent Sketchpad's sketch decoder (vision features -> picture) on any folder of images.

    python train/sketch_decoder.py --images data/maze/images --pattern '*-step*.png' \\
        --encoder runs/quickstart/tiny-base --encoder-image-size 112 --out runs/sketch_decoder
    python train/sketch_decoder.py --images DIR --encoder open_clip:ViT-B-16:laion2b_s34b_b88k \\
        --encoder-image-size 224 --vae stabilityai/sd-vae-ft-mse --out runs/sketch_decoder_clip

The encoder is frozen: a VLM's own ViT before the merger (a directory or hub id; the features the ``sketchpad`` method
generates, on pictures resized to its ``sketch_size`` = ``--encoder-image-size``; after the merger's norm with
``--encoder-norm``, for a ``head_target: merger_norm`` head) or an OpenCLIP ViT. Without
``--vae`` a small ``AutoencoderKL`` is trained first (L1 + KL, foreground pixels up-weighted); then the aligner learns
to map each image's features to the VAE's latent mean (MSE), optionally also through the frozen VAE decoder to the
pixels (``--pixel-weight``). A held-out share of the images is never trained on: the decoder reconstructs them from
their features and ``metrics.json`` reports PSNR, foreground IoU and (``--path-color``) path-pixel IoU, next to
``reconstructions.png`` (rows: original, VAE round trip, decoded from vision features).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vlatent.decoders.sketch import SketchDecoder, SketchDecoderConfig, load_vae, load_vision_encoder, to_pil, to_tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Train a sketch decoder (aligner + AutoencoderKL) for a vision encoder.")
    ap.add_argument("--images", required=True, help="folder of training images (searched recursively)")
    ap.add_argument("--pattern", default="*", help="file name glob inside --images, e.g. '*-step*.png' (default: all)")
    ap.add_argument("--encoder", required=True, help="a VLM directory / hub id, or open_clip:ARCH[:PRETRAINED]")
    ap.add_argument("--encoder-image-size", type=int, default=448, help="px the encoder sees (sketchpad sketch_size)")
    ap.add_argument("--encoder-norm", action="store_true",
                    help="features after the merger's norm (for a sketchpad head trained with head_target merger_norm)")
    ap.add_argument("--out", required=True, help="output decoder directory")
    ap.add_argument("--image-size", type=int, default=112, help="px of the decoded pictures")
    ap.add_argument("--vae", default=None, help="pretrained AutoencoderKL (hub id, directory, or ID:SUBFOLDER); "
                                                "default: train a small one")
    ap.add_argument("--vae-channels", default="16,32,32,32", help="small VAE block widths (one per resolution)")
    ap.add_argument("--vae-steps", type=int, default=300)
    ap.add_argument("--aligner-steps", type=int, default=3000,
                    help="aligner updates; on 2700 maze sketches of the tiny base's ViT held-out path IoU was 0.18 at "
                         "600, 0.44 at 1500 and 0.72 (the VAE round trip's) at 3000 (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the small VAE")
    ap.add_argument("--aligner-lr", type=float, default=3e-4)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--foreground-weight", type=float, default=5.0, help="pixel-loss weight of non-background pixels")
    ap.add_argument("--pixel-weight", type=float, default=0.0,
                    help="aligner: weight of the pixel L1 through the frozen VAE decoder (slower; 0 = latent MSE only)")
    ap.add_argument("--holdout", type=float, default=0.1, help="share of images held out for the reconstruction test")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--path-color", default=None, help="R,G,B of path pixels for the path IoU (maze: 40,100,230)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    return ap.parse_args(argv)


def check_args(args) -> tuple[list[Path], tuple[int, ...], tuple[int, int, int] | None]:
    """Everything that can be wrong with the arguments, before any model loads."""
    root = Path(args.images)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {args.images!r} is not a directory")
    files = sorted(p for p in root.rglob(args.pattern) if p.suffix.lower() in IMAGE_SUFFIXES)
    if args.max_images is not None:
        random.Random(args.seed).shuffle(files)
        files = sorted(files[: args.max_images])
    if len(files) < 2:
        raise ValueError(f"--images {args.images!r} has {len(files)} image(s) matching {args.pattern!r}; need >= 2")
    if not 0 < args.holdout < 1:
        raise ValueError(f"--holdout must be between 0 and 1, got {args.holdout}")
    for name in ("vae_steps", "aligner_steps", "batch_size", "image_size", "encoder_image_size"):
        if getattr(args, name) < (0 if name.endswith("steps") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    try:
        channels = tuple(int(c) for c in args.vae_channels.split(","))
        color = tuple(int(c) for c in args.path_color.split(",")) if args.path_color else None
    except ValueError as e:
        raise ValueError(f"--vae-channels / --path-color must be comma-separated integers: {e}") from e
    if color is not None and (len(color) != 3 or not all(0 <= c <= 255 for c in color)):
        raise ValueError(f"--path-color must be R,G,B in 0..255, got {args.path_color!r}")
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {args.out!r} is not empty: pass --overwrite to replace it")
    return files, channels, color


def foreground(x: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """(b, 3, h, w) pictures and (b, 3) background colours -> (b, 1, h, w) bool: pixels off the background."""
    return ((x - background[:, :, None, None]).abs().amax(1, keepdim=True) > 0.25)


def background_colour(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, h, w) -> (b, 3): the median colour of each picture's one-pixel border."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (b, 3, 4 * side)
    return border.median(dim=2).values


def weighted_l1(pred, target, background, weight: float) -> torch.Tensor:
    w = 1 + (weight - 1) * foreground(target, background).float()
    return ((pred - target).abs() * w).sum() / (w.sum() * 3)


def metrics(pred: torch.Tensor, target: torch.Tensor, colour=None) -> dict:
    """PSNR (dB, mean over pictures), foreground IoU and path-pixel IoU (pooled over pictures with any path)."""
    mse = ((pred - target) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    out = {"psnr": round(float((10 * torch.log10(4 / mse)).mean()), 2)}
    bg = background_colour(target)
    a, b = foreground(target, bg), foreground(pred, bg)
    out["foreground_iou"] = round(float((a & b).sum() / (a | b).sum().clamp_min(1)), 4)
    if colour is not None:
        c = torch.tensor(colour, dtype=pred.dtype).view(1, 3, 1, 1) / 127.5 - 1
        tol = 60 / 127.5  # per channel, in [-1, 1] units
        a = ((target - c).abs().amax(1) <= tol)
        b = ((pred - c).abs().amax(1) <= tol)
        keep = a.flatten(1).any(1)
        out["path_iou"] = round(float((a & b)[keep].sum() / (a | b)[keep].sum().clamp_min(1)), 4)
        out["path_images"] = int(keep.sum())
    return out


def figure(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of (n, 3, s, s) pictures -> one PNG grid with a 2 px gap."""
    n, s = rows[0].shape[0], rows[0].shape[-1]
    sheet = Image.new("RGB", (n * (s + 2), len(rows) * (s + 2)), "white")
    for r, row in enumerate(rows):
        for i, x in enumerate(row):
            sheet.paste(to_pil(x), (i * (s + 2), r * (s + 2)))
    sheet.save(path)


def batches(n: int, size: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(n, (size,), generator=gen)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        files, channels, colour = check_args(args)
        vae = load_vae(args.vae) if args.vae else None
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(files), generator=gen).tolist()
    n_test = max(1, round(args.holdout * len(files)))
    test_files, train_files = [files[i] for i in order[:n_test]], [files[i] for i in order[n_test:]]

    started = time.time()
    encoder = load_vision_encoder(args.encoder, args.encoder_image_size, args.encoder_norm)
    pictures, features = {}, {}
    for split, names in (("train", train_files), ("test", test_files)):
        feats, pics = [], []
        for i in range(0, len(names), 32):
            images = [Image.open(p).convert("RGB") for p in names[i : i + 32]]
            feats.append(encoder(images))
            pics.append(torch.stack([to_tensor(im, args.image_size) for im in images]))
        features[split], pictures[split] = torch.cat(feats), torch.cat(pics)
    x_train, f_train = pictures["train"], features["train"]
    bg_train = background_colour(x_train)
    print(f"{len(train_files)} training / {len(test_files)} held-out images; features {tuple(f_train.shape[1:])} "
          f"from {args.encoder!r} ({time.time() - started:.0f} s)")

    config = SketchDecoderConfig(feature_dim=f_train.shape[2], num_features=f_train.shape[1],
                                 image_size=args.image_size, encoder=args.encoder,
                                 encoder_image_size=args.encoder_image_size, encoder_norm=args.encoder_norm,
                                 vae=args.vae,
                                 vae_block_out_channels=channels)
    decoder = SketchDecoder(config, vae)
    log = []

    if args.vae is None:  # phase 1: the small VAE
        vae = decoder.vae.train()
        opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
        for step, idx in enumerate(batches(len(x_train), args.batch_size, args.vae_steps, gen), start=1):
            x = x_train[idx]
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample(generator=gen)).sample
            loss = weighted_l1(rec, x, bg_train[idx], args.foreground_weight) + args.kl_weight * posterior.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 1 or step % 25 == 0 or step == args.vae_steps:
                log.append({"phase": "vae", "step": step, "loss": round(loss.item(), 5)})
                print(log[-1], flush=True)
    decoder.vae.eval().requires_grad_(False)

    # phase 2: the aligner, to the frozen VAE's latent means
    with torch.no_grad():
        z_train = torch.cat([decoder.vae.encode(x_train[i : i + 64]).latent_dist.mean
                             for i in range(0, len(x_train), 64)])
    aligner = decoder.aligner.train()
    opt = torch.optim.AdamW(aligner.parameters(), lr=args.aligner_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, args.aligner_steps))
    for step, idx in enumerate(batches(len(x_train), args.batch_size, args.aligner_steps, gen), start=1):
        z = aligner(f_train[idx])
        loss = F.mse_loss(z, z_train[idx])
        if args.pixel_weight > 0:
            rec = decoder.vae.decode(z).sample
            loss = loss + args.pixel_weight * weighted_l1(rec, x_train[idx], bg_train[idx], args.foreground_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step == 1 or step % 50 == 0 or step == args.aligner_steps:
            log.append({"phase": "aligner", "step": step, "loss": round(loss.item(), 5)})
            print(log[-1], flush=True)
    decoder.eval()

    with torch.no_grad():  # held-out reconstruction from vision features
        x_test = pictures["test"]
        decoded = torch.cat([decoder.decode_tensor(features["test"][i : i + 32]) for i in range(0, len(x_test), 32)])
        vae_round = torch.cat([decoder.vae.decode(decoder.vae.encode(x_test[i : i + 32]).latent_dist.mean).sample
                               for i in range(0, len(x_test), 32)]).clamp(-1, 1)
    result = {"held_out_images": len(test_files), "train_images": len(train_files),
              "decoded_from_features": metrics(decoded, x_test, colour),
              "vae_round_trip": metrics(vae_round, x_test, colour),
              "minutes": round((time.time() - started) / 60, 1), "cpu_minutes": round(time.process_time() / 60, 1),
              "args": vars(args)}
    out = decoder.save_pretrained(args.out)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    figure([x_test[:8], vae_round[:8], decoded[:8]], out / "reconstructions.png")
    print(json.dumps({k: result[k] for k in ("decoded_from_features", "vae_round_trip", "minutes", "cpu_minutes")}))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
