"""Do the latents differ from example to example, and toward their own targets?

Swapping two examples' latents can only change an answer if the latents differ between them. ``latent_specificity``
measures that directly on the latents of a set of examples (in the order they were produced, ``rows`` naming each
one's example and ``index`` its step within the example): the mean cosine between latents of *different* examples at
the same step (1.0: every example gets the same latents), and, given the targets they were trained toward (Mirage's
pooled helper-image embeddings), how close each latent is to its own target against other examples' targets at the
same step, and how often its own target is the nearest one (chance: one over the number of examples at that step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Specificity:
    across: float  # mean cos(latent_i, latent_j), different examples, same step
    own: float | None = None  # mean cos(latent_i, target_i)
    other: float | None = None  # mean cos(latent_i, target_j), different examples, same step
    retrieval: float | None = None  # share of latents whose nearest same-step target is their own
    chance: float | None = None  # the retrieval of a latent that picks a same-step target at random


def latent_specificity(latents: torch.Tensor, rows: torch.Tensor, index: torch.Tensor,
                       targets: torch.Tensor | None = None) -> Specificity:
    """``latents`` (n, hidden); ``rows`` (n,) the example of each; ``index`` (n,) its step within the example;
    ``targets`` (n, hidden) or None."""
    if latents.shape[0] != rows.shape[0] or latents.shape[0] != index.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {rows.shape[0]} rows and {index.shape[0]} step indices")
    pairs = (index[:, None] == index[None]) & (rows[:, None] != rows[None])  # (n, n) same step, other example
    if not pairs.any():
        raise ValueError("latent_specificity needs latents of at least two examples at the same step")
    z = F.normalize(latents.float(), dim=-1)
    result = Specificity(across=(z @ z.T)[pairs].mean().item())
    if targets is not None:
        if targets.shape != latents.shape:
            raise ValueError(f"targets {tuple(targets.shape)} do not match latents {tuple(latents.shape)}")
        sim = z @ F.normalize(targets.float(), dim=-1).T  # (n, n): latent i against target j
        candidates = pairs | torch.eye(len(z), dtype=torch.bool, device=z.device)
        nearest = sim.masked_fill(~candidates, float("-inf")).argmax(1)
        result.own, result.other = sim.diag().mean().item(), sim[pairs].mean().item()
        result.retrieval = (nearest == torch.arange(len(z), device=z.device)).float().mean().item()
        result.chance = (1 / candidates.sum(1).float()).mean().item()
    return result


def generated_specificity(runs: list) -> Specificity | None:
    """``latent_specificity`` of the latents a set of ``generate`` runs fed (one run per example; None when fewer than
    two examples reasoned in latents)."""
    latents = [torch.cat([s.latents for s in g.latent_segments]) for g in runs if g.latent_segments]
    if len(latents) < 2:
        return None
    return latent_specificity(torch.cat(latents), torch.cat([torch.full((len(z),), i) for i, z in enumerate(latents)]),
                              torch.cat([torch.arange(len(z)) for z in latents]))
