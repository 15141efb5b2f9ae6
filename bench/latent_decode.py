"""Latent decode speed: a latent step vs a text step, the KV-cache speed-up, tokens/s at batch 1 vs 8.

    python bench/latent_decode.py [--hidden 256 --layers 4 --device cpu]

Targets: a latent step costs <= 1.1x a text step; the cache pays off at 128 generated positions; with
``latent_bottleneck`` (the cached loop masks each fed row, recomputing the spans over the ids fed so far) a latent step
costs <= 1.1x one without it.
Prints a markdown table to paste into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from vlatent.model import LatentVLM
from vlatent.testing import build_tiny_base, tiny_image


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_base(tmp, hidden_size=args.hidden, num_hidden_layers=args.layers,
                               intermediate_size=4 * args.hidden, num_attention_heads=args.hidden // 32,
                               num_key_value_heads=max(1, args.hidden // 128), vision_out_hidden_size=args.hidden)
        # K as large as the run: a latent-prefixed row then stays in latent mode for every step
        model = LatentVLM.from_pretrained(base, method="mirage", num_latent_tokens=args.steps).to(args.device).eval()
    start = model.method.config.latent_start_token
    image, prompt = tiny_image(0), "Describe the picture in detail."
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():  # keep text rows generating for the whole run: never let the random model stop early
        for emb in (model.backbone.model.get_output_embeddings(),):
            emb.weight[[eos, model.tokenizer.pad_token_id]] = -emb.weight[[eos, model.tokenizer.pad_token_id]].abs()

    def run(batch: int, n: int, latent: bool, use_cache: bool = True):
        prefix = start if latent else ""
        gens = model.generate([image] * batch, [prompt] * batch, max_new_tokens=n, prefix=prefix,
                              use_cache=use_cache)
        return gens

    def per_step(latent: bool, batch: int = 1) -> float:
        n = args.steps
        full = timed(lambda: run(batch, n, latent), args.repeats)
        prefill = timed(lambda: run(batch, 1, latent), args.repeats)
        return (full - prefill) / (n - 1)

    gens = run(1, args.steps, latent=False)
    assert not gens[0].latent_segments and gens[0].num_steps == args.steps, "text run must stay in text mode"
    gens = run(1, args.steps, latent=True)
    assert gens[0].latent_segments and gens[0].latent_segments[0].k >= args.steps - 1, "latent run must stay latent"

    text_ms = per_step(False) * 1e3
    rounds = {False: [], True: []}  # with and without the bottleneck in turn, so a busy spell hits both alike
    for _ in range(3):
        for blind in rounds:
            model.method.config.latent_bottleneck = blind
            rounds[blind].append(per_step(True) * 1e3)
    model.method.config.latent_bottleneck = False
    latent_ms, blind_ms = statistics.median(rounds[False]), statistics.median(rounds[True])
    cached = timed(lambda: run(1, args.steps, latent=False), args.repeats)
    uncached = timed(lambda: run(1, args.steps, latent=False, use_cache=False), 1)
    tps = {b: b * args.steps / timed(lambda: run(b, args.steps, latent=False), args.repeats) for b in (1, 8)}

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: Qwen2.5-VL-shaped, hidden {args.hidden}, {args.layers} layers, {n_params:.1f}M params, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| measure | value |\n|---|---|")
    print(f"| text step (batch 1) | {text_ms:.2f} ms |")
    print(f"| latent step (batch 1) | {latent_ms:.2f} ms |")
    print(f"| latent / text step | {latent_ms / text_ms:.2f}x (target <= 1.1x) |")
    print(f"| latent step with latent_bottleneck (batch 1) | {blind_ms:.2f} ms ({blind_ms / latent_ms:.2f}x without; "
          "target <= 1.1x) |")
    print(f"| {args.steps} positions, cached | {cached * 1e3:.0f} ms |")
    print(f"| {args.steps} positions, uncached | {uncached * 1e3:.0f} ms |")
    print(f"| KV-cache speed-up at {args.steps} positions | {uncached / cached:.1f}x |")
    print(f"| tokens/s batch 1 | {tps[1]:.0f} |")
    print(f"| tokens/s batch 8 | {tps[8]:.0f} ({tps[8] / tps[1]:.1f}x batch 1) |")


if __name__ == "__main__":
    main()
