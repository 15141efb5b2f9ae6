"""Look inside latent vectors: where on the input image each latent points, which tokens it is closest to, its size.

Every view works for any method, because it reads only the LM-space vectors a latent segment fed back
(``LatentSegment.latents``) and the model's own parts:

- a heat map of the cosine similarity between each latent and the input image's patch features (vision tower +
  projector, i.e. the vectors that stand for the image's merged patches in the LM's input), overlaid on the image;
- the nearest vocabulary tokens of each latent through the LM head (the "logit lens": what the model would say if
  the latent were its last hidden state) and through the input embedding table (cosine similarity to each row);
- the L2 norm of each latent, next to the mean norm of the token embeddings for scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class PatchFeatures:
    """The input image as the LM sees it: one LM-space vector per merged patch, raster order."""

    features: torch.Tensor  # (rows * cols, hidden)
    grid: tuple[int, int]  # (rows, cols) of merged patches
    image: Image.Image  # the picture the features came from (what heat maps are drawn over)


@dataclass
class LatentInspection:
    """All views of one latent segment of K latents."""

    norms: torch.Tensor  # (k,) L2 norm of each latent
    lm_head_tokens: list[list[tuple[str, float]]]  # per latent: top tokens and their probabilities
    embedding_tokens: list[list[tuple[str, float]]]  # per latent: top tokens and cosine similarity to their embedding
    similarity: torch.Tensor | None = None  # (k, rows, cols) cosine similarity to each patch; None without an image
    overlays: list[Image.Image] | None = None  # k heat maps over the input image, one per latent
    mean_overlay: Image.Image | None = None  # the segment's mean similarity over the image


@torch.no_grad()
def image_patch_features(model, image: Image.Image) -> PatchFeatures:
    """Run ``image`` through the model's processor, vision tower and projector: (rows * cols, hidden) patch features."""
    from ..generation import encode_prompts  # the processor call generation itself makes, so the features are the same

    image = image.convert("RGB")
    batch = encode_prompts(model, [[image]], [""], [""])
    features = model.backbone.encode_images(batch["pixel_values"], batch["image_grid_thw"])[0].float()
    grid = model.backbone.token_grid(batch["image_grid_thw"][0], features.shape[0])  # the family's own layout
    return PatchFeatures(features[:grid[0] * grid[1]].cpu(), grid, image)


def patch_similarity(latents: torch.Tensor, patches: PatchFeatures) -> torch.Tensor:
    """Cosine similarity of each latent to each patch: (k, hidden) -> (k, rows, cols)."""
    sim = F.normalize(latents.float(), dim=-1) @ F.normalize(patches.features.float(), dim=-1).T  # (k, n_patches)
    return sim.view(-1, *patches.grid)


def heatmap_overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.55, size: int = 224,
                    cmap: str = "inferno") -> Image.Image:
    """``heat`` (rows, cols), min-max scaled, coloured and blended over ``image`` (resized to ``size`` px wide)."""
    from matplotlib import colormaps

    h = heat.float()
    h = (h - h.min()) / (h.max() - h.min()).clamp_min(1e-8)
    rgba = colormaps[cmap](h.numpy(), bytes=True)  # (rows, cols, 4) uint8
    base = image.convert("RGB")
    base = base.resize((size, max(1, round(size * base.height / base.width))), Image.Resampling.BILINEAR)
    colour = Image.fromarray(rgba[..., :3]).resize(base.size, Image.Resampling.BILINEAR)
    return Image.blend(base, colour, alpha)


@torch.no_grad()
def nearest_tokens(model, latents: torch.Tensor, top: int = 5) -> tuple[list, list]:
    """Per latent, the ``top`` tokens through the LM head (probability) and through the input embeddings (cosine).

    Rows past the tokenizer (the embedding matrix is padded to a multiple of 64) are never returned."""
    tok = model.tokenizer
    vocab = len(tok)
    z = latents.to(model.device, model.dtype)  # (k, hidden)
    probs = torch.softmax(model.backbone.logits(z).float()[:, :vocab], dim=-1)  # (k, vocab)
    table = model.backbone.model.get_input_embeddings().weight[:vocab].float()  # (vocab, hidden)
    cos = F.normalize(z.float(), dim=-1) @ F.normalize(table, dim=-1).T  # (k, vocab)

    def named(values, ids):
        return [[(tok.decode([i]), float(v)) for v, i in zip(vs.tolist(), row.tolist())]
                for vs, row in zip(values, ids)]

    return named(*probs.topk(min(top, vocab), dim=-1)), named(*cos.topk(min(top, vocab), dim=-1))


@torch.no_grad()
def embedding_norm(model) -> float:
    """Mean L2 norm of the token embeddings: the scale a latent's norm is read against."""
    table = model.backbone.model.get_input_embeddings().weight[: len(model.tokenizer)]
    return float(table.float().norm(dim=-1).mean())


def inspect_latents(model, latents: torch.Tensor, patches: PatchFeatures | None = None, top: int = 5,
                    size: int = 224) -> LatentInspection:
    """Every view of one segment's latents (``LatentSegment.latents``, (k, hidden)); heat maps need ``patches``."""
    if latents.dim() != 2 or latents.shape[-1] != model.backbone.hidden_size:
        raise ValueError(f"latents must be (k, {model.backbone.hidden_size}), got {tuple(latents.shape)}")
    lm_head, embeddings = nearest_tokens(model, latents, top)
    out = LatentInspection(norms=latents.float().norm(dim=-1).cpu(), lm_head_tokens=lm_head,
                           embedding_tokens=embeddings)
    if patches is not None:
        out.similarity = patch_similarity(latents.cpu(), patches)  # (k, rows, cols)
        out.overlays = [heatmap_overlay(patches.image, s, size=size) for s in out.similarity]
        out.mean_overlay = heatmap_overlay(patches.image, out.similarity.mean(0), size=size)
    return out
