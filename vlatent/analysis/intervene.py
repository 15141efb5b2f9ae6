"""Latent interventions: does the answer depend on what the latents hold?

``intervene`` reruns the same questions with every latent a method produces replaced, as it is fed back, by

- ``"zero"``: the zero vector;
- ``"swap"``: another example's latents (its unmodified run's latents, in order; the j-th latent step of an example
  takes the donor's j-th latent, cycling when the donor has fewer);
- ``"noise"``: Gaussian noise scaled to the norm of the latent it replaces;
- ``"none"``: nothing (the unmodified run itself),

and returns, per example, the unmodified run beside the intervened one. Each run is one batched ``generate``; the
replacement happens in ``generate``'s ``latent_hook``, so the rest of the loop (KV cache, text steps, segment ends)
is exactly the unmodified one. With sampling, pass a seeded ``generator`` to compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation import Generation, TextSegment, generate

MODES = ("none", "zero", "swap", "noise")


@dataclass
class InterventionResult:
    """One example: the unmodified run and the run with its latents replaced."""

    mode: str
    answer: str  # what the intervened run wrote (text segments only)
    baseline_answer: str  # what the unmodified run wrote
    generation: Generation
    baseline: Generation
    donor: int | None = None  # "swap": index of the example (or donor) whose latents were fed

    @property
    def changed(self) -> bool:
        return self.answer != self.baseline_answer


def answer_text(generation: Generation) -> str:
    """The words of a generation, latent segments left out."""
    return "".join(s.text for s in generation.segments if isinstance(s, TextSegment)).strip()


def _all_latents(generation: Generation) -> torch.Tensor | None:
    """Every latent of a run, in order: (n_latents, hidden), or None when it has none."""
    segments = generation.latent_segments
    return torch.cat([s.latents for s in segments]) if segments else None


def next_with_latents(runs: list[Generation], i: int) -> int | None:
    """The first example after ``i`` (cyclically, ``i`` excluded) whose run has latents."""
    n = len(runs)
    return next(((i + d) % n for d in range(1, n) if runs[(i + d) % n].latent_segments), None)


class LatentReplacer:
    """``generate``'s ``latent_hook`` for one intervention: replaces the latents of rows ``context.rows``."""

    def __init__(self, mode: str, donors: list[torch.Tensor | None] | None = None, seed: int = 0):
        self.mode = mode
        self.donors = donors  # "swap": per row, the donor's latents (n_i, hidden)
        self.fed: dict[int, int] = {}  # row -> latents replaced so far (the donor index to read next)
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, z: torch.Tensor, context) -> torch.Tensor:  # (m, hidden) -> (m, hidden)
        if self.mode == "zero":
            return torch.zeros_like(z)
        if self.mode == "noise":
            noise = torch.randn(z.shape, generator=self.rng).to(z.device, torch.float32)
            scale = z.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
            return (noise * scale).to(z.dtype)
        if z.shape[0] == 0:  # a synced step with no row in latent mode
            return z
        rows = []
        for row in context.rows.tolist():
            donor = self.donors[row]
            if donor is None:
                raise ValueError(f"swap: example {row} takes a latent step, but its donor's run produced no latents")
            j = self.fed.get(row, 0)
            self.fed[row] = j + 1
            rows.append(donor[j % donor.shape[0]])
        return torch.stack(rows).to(z.device, z.dtype)


def intervene(model, images, prompts, mode: str = "zero", *, baseline: list[Generation] | None = None,
              donor_images=None, donor_prompts=None, donor_runs: list[Generation] | None = None, seed: int = 0,
              **generate_kwargs) -> list[InterventionResult]:
    """Run ``prompts`` (one per example, ``images`` as for ``generate``) with the latents replaced (see the module
    docstring); one ``InterventionResult`` per example, in order.

    ``baseline``: the unmodified generations, if already run with the same ``generate_kwargs`` (else run here).
    ``"swap"`` feeds example i the latents of the next example (cyclically) whose unmodified run has latents, or, with
    ``donor_images`` / ``donor_prompts`` (one per example), those of donor i's unmodified run, or, with ``donor_runs``
    (one per example), those of a donor run already made (e.g. an example of another batch). ``seed`` seeds the
    noise. ``generate_kwargs`` go to ``generate`` (``max_new_tokens``, ``prefix``, ...) for both runs.
    """
    if mode not in MODES:
        raise ValueError(f"unknown intervention mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(prompts, str):
        prompts, images = [prompts], [images]
    prompts = list(prompts)
    n = len(prompts)
    images = [None] * n if images is None else list(images)
    if (donor_images is None) != (donor_prompts is None):
        raise ValueError("donor_images and donor_prompts go together (one donor per example)")
    if donor_prompts is not None and (len(donor_prompts) != n or len(donor_images) != n):
        raise ValueError(f"one donor per example: got {len(donor_prompts)} donor prompts and {len(donor_images)} "
                         f"donor images for {n} examples")
    if donor_runs is not None and (donor_prompts is not None or len(donor_runs) != n):
        raise ValueError(f"donor_runs: one donor run per example ({len(donor_runs)} for {n} examples), and not "
                         "together with donor_images / donor_prompts")
    with_donors = donor_prompts is not None or donor_runs is not None
    if mode == "swap" and not with_donors and n < 2:
        raise ValueError("swap needs another example's latents: pass at least 2 prompts, or donors")
    if baseline is not None and len(baseline) != n:
        raise ValueError(f"baseline has {len(baseline)} generations for {n} examples")

    # the unmodified run (and the donors' runs, batched with it)
    run_donors = mode == "swap" and donor_prompts is not None
    if baseline is None:
        extra_images, extra_prompts = (list(donor_images), list(donor_prompts)) if run_donors else ([], [])
        runs = generate(model, images + extra_images, prompts + extra_prompts, **generate_kwargs)
        baseline, donor_runs = runs[:n], runs[n:] or donor_runs
    elif run_donors:
        donor_runs = generate(model, list(donor_images), list(donor_prompts), **generate_kwargs)
    if mode == "none":
        return [InterventionResult(mode, answer_text(g), answer_text(g), g, g) for g in baseline]

    donors = index = None
    if mode == "swap":
        index = list(range(n)) if with_donors else [next_with_latents(baseline, i) for i in range(n)]
        donors = [None if d is None else _all_latents((donor_runs or baseline)[d]) for d in index]
        for i, (base, donor) in enumerate(zip(baseline, donors)):
            if donor is None and base.latent_segments:
                raise ValueError(f"swap: example {i} reasons in latents but "
                                 f"{'its donor' if with_donors else 'no other example'} produced any; start the "
                                 "answers in latent mode (prefix) or pass donors")
    runs = generate(model, images, prompts, latent_hook=LatentReplacer(mode, donors, seed), **generate_kwargs)
    return [InterventionResult(mode, answer_text(g), answer_text(b), g, b, None if index is None else index[i])
            for i, (g, b) in enumerate(zip(runs, baseline))]
