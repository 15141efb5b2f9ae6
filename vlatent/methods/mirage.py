"""Mirage: Machine Mental Imagery (arXiv 2506.17218).

K latent tokens stand where the model "imagines" a helper image. Stage 1 teacher-forces, at the K pad
positions, the helper image's vision embeddings (frozen ViT + merger, already in LM space, raster order)
compressed to K vectors, and aligns the hidden state *before* each slot to its target:

    loss = ce_weight * CE(text) + alignment_weight * mean_k (1 - cos(h_{t_k - 1}, target_k))

Stage 2 drops the image supervision: each latent slot is filled with the previous position's final hidden
state (``next_latent`` is the identity), recurrently and with backpropagation through the chain, and only CE
is trained. At inference the same identity feeds the last hidden state back as the next input.

Choices the paper leaves open:
- Compression: the helper image's n merged tokens are split into K contiguous chunks in raster order and
  each chunk is mean-pooled; when K does not divide n, the first ``n % K`` chunks hold one token more
  (``torch.tensor_split``). An image with fewer than K tokens is refused (raise min_pixels).
- ``centre_targets`` (off by default, not in the paper): predictions and targets both minus the batch's mean target
  at the same slot index before the cosine. When helper images differ little, their pooled embeddings are nearly
  parallel (the tiny base's vsp route maps: cosine 0.87 between examples, depth maps 0.996), so the mean target
  alone scores almost perfectly and stage 1 learns it: every example then imagines the same latents. Centred, only
  what sets an example's helper image apart from the others' scores.
- ``stage2_alignment_weight`` (0 by default, as in the paper): stage 2 also aligns the latents it feeds itself to
  the helper images' targets at this weight. Trained on CE alone, the tiny base's stage 2 lets every example's latents
  drift to one vector (different examples' latents at cosine 0.996 after stage 2, 0.79 after stage 1), as nothing in
  CE needs them when the picture is in context.
- Stage 2 is unrolled exactly, one latent slot at a time, so several segments per example see their true
  predecessors: ``LatentVLM.fill_latents`` runs the sequence once on the KV cache, in chunks that end where a slot
  begins (with gradient checkpointing, which drops the cache, pass j recomputes every row up to its j-th slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LatentMethod, MethodConfig, register_method, slot_means


@dataclass
class MirageConfig(MethodConfig):
    ce_weight: float = 0.1  # stage 1 text CE weight (paper: 0.1); stage 2 trains CE at weight 1
    alignment_weight: float = 1.0
    # ``latent_steps: model`` decodes as released: a segment ends at the picked <|latent_end|> or after
    # MAX_LATENT_LEN = 8 latents (UMass-Embodied-AGI/Mirage@53f26de transformers/src/transformers/generation/
    # utils.py:3295, 3380-3396). The default stays "fixed": see docs/fidelity.md (inference).
    max_latent_steps: int | None = 8
    centre_targets: bool = False  # see the module docstring; not in the paper
    stage2_alignment_weight: float = 0.0  # > 0: stage 2 keeps aligning its own latents (not in the paper; docstring)


def pool_to_k(features: torch.Tensor, k: int) -> torch.Tensor:
    """(n, hidden) -> (k, hidden): mean over k contiguous chunks; the first n % k chunks are one longer."""
    if features.shape[0] < k:
        raise ValueError(f"a helper image gives {features.shape[0]} vision tokens, fewer than K={k} latent tokens; "
                         "use a larger image or min_pixels")
    return torch.stack([chunk.mean(0) for chunk in torch.tensor_split(features, k)])


@register_method
class Mirage(LatentMethod):
    name = "mirage"
    config_class = MirageConfig
    stages = (1, 2)

    def latent_mode(self) -> str:
        return "latent"

    def loss_weights(self):
        if self.config.stage == 1:
            return {"ce": self.config.ce_weight, "latent_alignment": self.config.alignment_weight}
        return {"ce": 1.0, **({"latent_alignment": w} if (w := self.config.stage2_alignment_weight) else {})}

    def next_latent(self, hidden, context=None):
        return hidden

    def training_losses(self, model, batch):
        if self.config.stage == 1:
            return self._stage1(model, batch)
        if self.config.stage == 2:
            return self._stage2(model, batch)
        raise ValueError(f"mirage has stages 1 and 2, got stage={self.config.stage}")

    def _targets(self, model, batch) -> torch.Tensor | None:
        """The helper images' embeddings pooled to K per segment: (n_slots, hidden), or None without helpers."""
        targets = model.latent_targets(batch)  # list over segments of (n_i, hidden)
        return torch.cat([pool_to_k(t, self.config.num_latent_tokens) for t in targets]) if targets else None

    def _alignment(self, predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """mean (1 - cos) between each slot's prediction and its target, both centred with ``centre_targets``."""
        predicted, targets = predicted.float(), targets.float()
        if self.config.centre_targets:
            mean = slot_means(targets, self.config.num_latent_tokens)  # (n_slots, hidden), no gradient
            predicted, targets = predicted - mean, targets - mean
        return (1 - F.cosine_similarity(predicted, targets, dim=-1)).mean()

    def _stage1(self, model, batch):
        slots = model.latent_slots(batch)  # (n_slots,) batch index, (n_slots,) position
        targets = self._targets(model, batch)
        embeds = model.embed_inputs(batch)
        if targets is not None:
            model.check_latent_targets(slots, targets, batch)
            embeds = embeds.index_put(slots, targets.to(embeds.dtype))
        hidden = model.run_language_model(embeds, batch).last_hidden_state  # (batch, seq, hidden)
        losses = {"ce": model.lm_loss(hidden, batch["labels"])}
        if targets is None:
            losses["latent_alignment"] = hidden.sum() * 0.0  # keeps the graph (and ZeRO-3 ranks) uniform
        else:
            b, t = slots
            losses["latent_alignment"] = self._alignment(hidden[b, t - 1], targets)  # the state before slot t
        return losses

    def _stage2(self, model, batch):
        embeds = model.embed_inputs(batch)
        embeds, out, slots = model.fill_latents(embeds, batch, model.position_ids(batch),
                                                model.decoder_mask(batch, embeds.dtype))
        losses = {"ce": model.lm_loss(out.last_hidden_state, batch["labels"])}
        if self.config.stage2_alignment_weight:  # the latents fed (each the state before its slot) to their targets
            targets = self._targets(model, batch)
            if targets is None:
                losses["latent_alignment"] = out.last_hidden_state.sum() * 0.0  # uniform graph, as in stage 1
            else:
                model.check_latent_targets(slots, targets, batch)
                losses["latent_alignment"] = self._alignment(embeds[slots], targets)
        return losses
