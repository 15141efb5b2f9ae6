"""VLPO: Visual-latent Policy Optimization (Monet, arXiv 2511.21395), GRPO whose policy gradient reaches the latents.

For each prompt a group of G rollouts comes from ``LatentVLM.generate`` with sampling. A latent step is an action
too: the latent fed back is drawn from ``N(mu(h_q), sigma^2 I)`` around the method's prediction
``mu = next_latent(h_q)``, ``h_q`` being the hidden state of the position *before* the latent slot, the one that
produced it (the released code is off by one here). The generator returns the sampled latents, their means and their
positions. Rewards are group-normalised into advantages, and the clipped-ratio objective runs over the sampled text
tokens *and* the latent steps:

    ratio_t = pi(a_t) / pi_old(a_t)     text: softmax(logits / temperature) of the sampled token;
                                        latent: the Gaussian density N(z_{q+1}; mu(h_q), sigma^2 I), in full
    loss_t  = -min(min(ratio_t, delta) * A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3, low variance; latents use the reference's mu)

The log-ratios are clamped to +-20 and KL_t to <= 10, as verl's (which Monet's RL runs on): in high dimension a latent's
Gaussian log-ratio ``(|z - mu_old|^2 - |z - mu|^2) / 2 sigma^2`` reaches hundreds after one update.

Forced steps are no actions and are masked out: the end token that closes a latent segment (forced after K latents, or
chosen by the LM head's argmax with ``latent_steps: auto``), padding after the stop token. ``score_latents: false`` is
the variant of prior latent-RL work: latents are generated but masked out of the objective (text-only GRPO), so the
two can be compared from one recipe.

Knobs are named as TRL's ``GRPOConfig`` (``num_generations``, ``max_completion_length``, ``temperature``, ``top_p``,
``epsilon``, ``epsilon_high``, ``delta``, ``beta``, ``loss_type``, ``scale_rewards``, ``num_iterations``,
``reward_funcs``, ``reward_weights``). Where VLPO departs from TRL:

- ``latent_sigma``, ``latent_exploration``, ``score_latents``, ``prefix``, ``latent_steps``, ``updates_per_rollout``
  are new. Exploration is off by default, as released (Monet RL/monet_models/vllm/monet_gpu_model_runner.py:1331,
  ``sampled = mu  # + torch.randn_like(mu)``): rollouts feed ``z = mu`` and the latent term acts through the ratio once
  the policy has moved, from the second mini-batch update of a rollout batch on. ``latent_exploration: true`` samples
  ``z ~ N(mu, sigma^2 I)``; its noise norm ``sigma * sqrt(d)`` is logged beside the measured norm of ``mu``
  (``latents/noise_norm``, ``latents/mean_norm``) and stated once as their ratio.
- ``updates_per_rollout`` (the release's actor mini-batches; TRL's ``steps_per_generation`` counts micro-steps, i.e.
  ``updates_per_rollout x gradient_accumulation_steps``): one rollout batch of ``updates_per_rollout`` optimizer steps'
  prompts is generated at once by one policy, then trained on in that many mini-batch updates (each ``num_iterations``
  times), so from the second update on the ratio departs from 1 and clipping acts. Default 4: the release's 64 prompts
  per rollout and 16 per actor mini-batch (RL/examples/vlpo_train.sh ``ORI_BSZ=64``, config_monet.yaml
  ``worker.actor.global_batch_size: 16``; RL/verl/workers/actor/dp_actor.py:412-415).
- A group lives on one process (``per_device_train_batch_size`` counts completions, as in TRL, but must be a multiple
  of ``num_generations``), so group statistics need no gather; ``scale_rewards: batch`` gathers the rewards of the
  whole rollout batch (all its micro-batches, all processes) before any advantage is scaled.
- ``loss_type``: ``grpo`` (mean per completion, then over completions), ``bnpo`` (mean over the actions of the local
  batch), ``dr_grpo`` (sum / (batch x max_completion_length)), ``dapo`` (sum / actions of the micro-batch on all
  processes; TRL counts a whole generation batch). Latent steps count as actions in each.
- Rollouts are generated in micro-batches at the start of a rollout batch (no vLLM) and kept for its
  ``updates_per_rollout x num_iterations`` optimizer steps; the rewards of the whole rollout batch are logged at its
  first step. Text log-probs ignore ``top_p`` truncation (as TRL) and a method's ``constrain_logits``.
- Rewards take the completion's text (latent segments left out) and the record's fields (see ``rewards.py``).
- ``difficulty_filter`` (Monet's online difficulty sampling): a group whose share of correct rollouts (1.0 under
  ``difficulty_reward``) is 0 or above ``difficulty_threshold`` leaves the objective (its rows' actions are masked);
  ``difficulty/groups_kept`` / ``groups_dropped`` count the filter's verdicts per generated micro-batch. With
  ``difficulty_pool: 1`` the update has fewer prompts. With ``difficulty_pool: N > 1`` the rollout batch is refilled:
  DAPO's dynamic sampling, bounded by a pool of N x its prompts (the loader's first, then other prompts drawn from
  the dataset, seeded by seed, process and the batch's first step). Micro-batches are generated until enough groups
  are kept (on every process while any needs more: an all-reduce decides, generation being synced), and the batch
  holds kept groups only; short of them, the earliest unkept groups fill it masked (``difficulty/shortfall``,
  ``pool_prompts``). The release (Monet RL/verl/trainer/ray_trainer.py:575-579, 769-788) always rolls out its whole
  256-prompt pool and trains every full 64-prompt batch of kept prompts in it; we stop once one batch is full and drop the surplus.
- The KL reference (``beta > 0``) is a frozen full copy of the initial policy on every process (TRL runs it through
  DeepSpeed, partitioned under ZeRO-3): one forward per micro-batch, no all-gathers, one model's memory more.

The means are ``method.policy_means`` (``next_latent(h_q)``; Sketchpad: its vision head over each sketch with the
context generation gave it, the input images and the sketches generated before). Never a silent fallback:
``score_latents`` with a method that has no continuous latents, or whose latents VLPO cannot score
(``method.vlpo_refusal``: CoCoVa), is an error before the first rollout, and a step whose rollouts hold no latent step
is logged (``completions/latent_steps`` = 0) and warned about once.
Under ZeRO-3 with several processes every process runs the same forwards: rollouts are generated with ``synced=True``
and each objective forward calls the vision tower, the LM head and the latent head whatever the batch holds.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers.trainer_pt_utils import nested_gather
from transformers.utils import ModelOutput

from ..configs import from_dict
from ..generation import TextSegment, encode_prompts, normalize_inputs
from .rewards import get_reward, score_completions
from .trainer import LatentTrainer

logger = logging.getLogger(__name__)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LOG_RATIO_CLAMP = 20.0  # |log pi / pi_old| and |log pi_ref / pi| at most this (verl's bound)
KL_CLAMP = 10.0
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class VLPOConfig:
    """The ``vlpo:`` section of a recipe. TRL's names where TRL has the knob (see the module docstring)."""

    num_generations: int = 8  # G: rollouts per prompt
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    prefix: str | None = None  # the assistant turn starts with this (e.g. the latent start token)
    latent_steps: str = "fixed"  # "fixed": K latents per segment; "auto": the LM head ends a segment
    reward_funcs: list = field(default_factory=lambda: ["accuracy"])  # registered names or module:function
    reward_weights: list | None = None  # one per reward; None: all 1
    scale_rewards: str = "group"  # "group": A = (r - mean) / std per group; "batch": std of the whole batch; "none"
    num_iterations: int = 1  # mu: passes over each rollout batch (each pass: updates_per_rollout optimizer steps)
    updates_per_rollout: int = 4  # optimizer steps (actor mini-batches) per rollout batch, as released (64 / 16)
    epsilon: float = 0.2  # low clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # high clip: ratio <= 1 + epsilon_high (None: epsilon)
    delta: float | None = None  # dual clip: the unclipped ratio is capped at delta (> 1 + epsilon_high), bounding A < 0
    beta: float = 0.0  # KL to the frozen initial policy; 0 loads no reference model
    loss_type: str = "dapo"
    latent_sigma: float = 1.0  # sigma of the Gaussian latent policy N(mu, sigma^2 I)
    latent_exploration: bool = False  # sample latents around mu in rollouts; False: z = mu, as released
    score_latents: bool = True  # latent steps in the objective (VLPO); false: text-only GRPO, latents masked
    difficulty_filter: bool = False  # drop groups with no correct rollout or accuracy > threshold (Monet's filter)
    difficulty_threshold: float = 0.6  # a group is kept when 0 < its share of correct rollouts <= this (as released)
    difficulty_reward: str | None = None  # the reward in reward_funcs whose 1.0 means correct; None: the first one
    difficulty_pool: int = 1  # N > 1: refill the rollout batch with kept groups from up to N x its prompts

    @classmethod
    def from_dict(cls, d: dict, where: str = "vlpo") -> "VLPOConfig":
        config = from_dict(cls, d, where)
        config.validate(where)
        return config

    def validate(self, where: str = "vlpo") -> None:
        def fail(problem):
            raise ValueError(f"{where}: {problem}")

        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            fail(f"num_generations must be an integer >= 2 (a group needs a baseline), got {self.num_generations!r}")
        if not isinstance(self.max_completion_length, int) or self.max_completion_length < 1:
            fail(f"max_completion_length must be a positive integer, got {self.max_completion_length!r}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            fail(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.latent_steps not in ("fixed", "auto"):
            fail(f"latent_steps must be 'fixed' or 'auto', got {self.latent_steps!r}")
        if not isinstance(self.reward_funcs, list) or not self.reward_funcs:
            fail(f"reward_funcs must be a non-empty list of reward names, got {self.reward_funcs!r}")
        for name in self.reward_funcs:
            get_reward(name)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            fail(f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs")
        if self.scale_rewards not in SCALE_REWARDS:
            fail(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {self.scale_rewards!r}")
        if not isinstance(self.num_iterations, int) or self.num_iterations < 1:
            fail(f"num_iterations must be a positive integer, got {self.num_iterations!r}")
        if not isinstance(self.updates_per_rollout, int) or self.updates_per_rollout < 1:
            fail(f"updates_per_rollout must be a positive integer, got {self.updates_per_rollout!r}")
        if not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            fail(f"need 0 <= epsilon < 1 and epsilon_high >= 0, got {self.epsilon}, {self.epsilon_high}")
        if self.delta is not None and self.delta <= 1 + self.high:
            fail(f"delta (dual clip) must exceed 1 + epsilon_high = {1 + self.high}, got {self.delta}")
        if self.beta < 0:
            fail(f"beta must be >= 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            fail(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if (self.score_latents or self.latent_exploration) and not self.latent_sigma > 0:
            fail(f"latent_sigma must be > 0 (it is the latent policy's sigma), got {self.latent_sigma!r}")
        if not 0 <= self.difficulty_threshold <= 1:
            fail(f"difficulty_threshold must be in [0, 1] (a share of correct rollouts), "
                 f"got {self.difficulty_threshold!r}")
        if self.difficulty_reward is not None and self.difficulty_reward not in self.reward_funcs:
            fail(f"difficulty_reward {self.difficulty_reward!r} must be one of reward_funcs {self.reward_funcs}")
        if not isinstance(self.difficulty_pool, int) or self.difficulty_pool < 1:
            fail(f"difficulty_pool must be a positive integer, got {self.difficulty_pool!r}")
        if self.difficulty_pool > 1 and not self.difficulty_filter:
            fail(f"difficulty_pool={self.difficulty_pool} refills the batch with the groups the difficulty filter "
                 "keeps: set difficulty_filter: true (or difficulty_pool: 1)")

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def off_policy(self) -> bool:
        """Whether a rollout batch serves several optimizer steps (then the rollout policy's log-probs are kept)."""
        return self.updates_per_rollout * self.num_iterations > 1


# ---------------------------------------------------------------------------------------------------------------------
# The objective, piece by piece (pure functions, tested on hand-computed numbers)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """``log N(z; mu, sigma^2 I)`` over the last dimension: ``(..., d) x2 -> (...)``."""
    d = z.shape[-1]
    sq = (z.float() - mu.float()).pow(2).sum(-1)
    return -sq / (2 * sigma**2) - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """``(n,)`` rewards of consecutive groups of ``num_generations`` -> advantages ``(r - group mean) / (std + 1e-4)``.

    ``std``: the group's (unbiased, as TRL), ``batch_std`` for ``"batch"`` (default: of ``rewards``), 1 for ``"none"``.
    A group whose rewards are all equal gets advantage 0.
    """
    groups = rewards.view(-1, num_generations)  # (n_groups, G)
    centred = groups - groups.mean(1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (groups.std(1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        centred = centred / ((rewards.std() if batch_std is None else batch_std) + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    return centred.reshape(-1)


def difficulty_keep(correct: torch.Tensor, num_generations: int, threshold: float) -> torch.Tensor:
    """``(n,)`` correctness of consecutive groups (1.0 correct; anything else, ``nan`` too, not) -> ``(n_groups,)``
    bool, kept when ``0 < share correct <= threshold``: Monet's online difficulty filter (RL/verl/trainer/ray_trainer.py
    769-788: groups with a correct rollout enter the pool, those above ``select_acc_threshold`` leave it)."""
    share = (correct.view(-1, num_generations) == 1).float().mean(1)
    return (share > 0) & (share <= threshold)


def clipped_objective(log_probs, old_log_probs, advantages, epsilon: float, epsilon_high: float,
                      delta: float | None = None):
    """Per-action PPO/GRPO loss ``-min(min(r, delta) A, clip(r, 1 - eps, 1 + eps_high) A)`` with ``r = exp(lp - old)``.

    Returns ``(loss, low_clipped, high_clipped)``: ``low_clipped`` where ``r < 1 - eps`` and ``A < 0`` (the clip
    binds), ``high_clipped`` where ``r > 1 + eps_high`` and ``A > 0``. Shapes broadcast (e.g. ``(B, C)`` x ``(B, 1)``).
    The log-ratio is clamped to +-20 first (as verl): a latent's Gaussian log-ratio can be hundreds in high dimension.
    """
    ratio = torch.exp(torch.clamp(log_probs - old_log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss = -torch.min(unclipped * advantages, clipped * advantages)
    low = (ratio < 1 - epsilon) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, low, high


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """The low-variance KL estimator ``exp(ref - lp) - (ref - lp) - 1`` (>= 0), per action, bounded as verl's
    ``low_var_kl`` (which Monet's RL code runs): ``ref - lp`` clamped to +-20, the estimate to at most 10."""
    diff = torch.clamp(ref_log_probs - log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(diff) - diff - 1, max=KL_CLAMP)


def aggregate(per_action: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
              normalizer: float | None = None) -> torch.Tensor:
    """``(B, C)`` per-action losses and action mask -> the scalar loss of ``loss_type`` (see the module docstring).
    ``normalizer``: ``dapo``'s number of actions per process (default: this batch's)."""
    mask = mask.to(per_action.dtype)
    total = (per_action * mask).sum()
    if loss_type == "grpo":
        return ((per_action * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total / (per_action.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return total / max(normalizer if normalizer is not None else float(mask.sum()), 1.0)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts -> tensors


def record_prompt(record: dict) -> tuple[str, list[str]]:
    """A record's question as asked: the text of every turn before the first assistant turn, and its images."""
    items = []
    for msg in record["messages"]:
        if msg["role"] == "assistant":
            break
        items += msg["content"]
    text = "\n".join(c["text"] for c in items if c["type"] == "text")
    return text, [record["images"][c["image"]] for c in items if c["type"] == "image"]


@dataclass
class Rollouts:
    """A batch of completions for the objective: the prompts as generation encoded them (left-padded) and the
    completions (right-padded). Completion position ``c`` follows the prompt; its action came from the hidden state
    one position earlier (the prompt's last for ``c = 0``)."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    mm_token_type_ids: torch.Tensor  # (B, P)
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    completion_ids: torch.Tensor  # (B, C): every generated step; latent steps hold the latent pad id
    completion_mask: torch.Tensor  # (B, C) bool: steps the row generated
    text_mask: torch.Tensor  # (B, C) bool: sampled text tokens (scored by the LM head)
    latent_mask: torch.Tensor  # (B, C) bool: latent steps (scored as Gaussian actions)
    latents: torch.Tensor  # (n_latent, hidden): the sampled latents, row-major in latent_mask order
    advantages: torch.Tensor  # (B,)
    ids: list  # record id of each row
    old_log_probs: torch.Tensor | None = None  # (B, C), when the rollouts serve several optimizer steps
    ref_log_probs: torch.Tensor | None = None  # (B, C), when beta > 0
    normalizer: float | None = None  # dapo: actions per process in this micro-batch
    kept: torch.Tensor | None = None  # (B,) bool: rows whose group the difficulty filter keeps (None: all)
    segment_features: list = field(default_factory=list)  # each latent segment's method features, row-major


@dataclass
class Scored:
    """Generated and scored rollouts before a micro-batch is built from them: one row per record, in groups of
    ``num_generations`` consecutive rows (the difficulty pool picks groups from several of these)."""

    records: list
    images: list
    prompts: list
    prefixes: list
    generations: list
    advantages: torch.Tensor  # (B,); under ``scale_rewards: batch`` centred only until the rollout batch is scaled
    rewards: torch.Tensor  # (B,) the weighted sum of the reward functions
    kept: torch.Tensor | None  # (B,) bool: the difficulty filter's verdict on each row's group (None: no filter)

    def groups(self, size: int) -> list["Scored"]:
        """One ``Scored`` per group of ``size`` consecutive rows."""
        return [Scored(*(getattr(self, f.name)[i : i + size] for f in fields(Scored)))
                for i in range(0, len(self.records), size)]

    @staticmethod
    def cat(parts: list["Scored"]) -> "Scored":
        """The rows of ``parts``, in order."""
        columns = ([getattr(p, f.name) for p in parts] for f in fields(Scored))
        return Scored(*(torch.cat(c) if torch.is_tensor(c[0]) else sum(c, []) for c in columns))


def build_rollouts(model, images, prompts, prefixes, generations, advantages, ids) -> Rollouts:
    """Encode the prompts exactly as ``generate`` did and lay out each completion's steps (text tokens, latent pads,
    forced end tokens, the stop token) with the sampled latents; forced end tokens are no actions."""
    batch = encode_prompts(model, images, prompts, prefixes)
    cfg = model.method.config
    n, device = len(generations), batch["input_ids"].device
    length = max(max(len(g.token_ids) for g in generations), 1)
    completion = torch.full((n, length), model.tokenizer.pad_token_id, dtype=torch.long)
    inside = torch.zeros(n, length, dtype=torch.bool)
    latents, features = [], []
    for b, g in enumerate(generations):
        completion[b, : len(g.token_ids)] = torch.tensor(g.token_ids, dtype=torch.long)
        inside[b, : len(g.token_ids)] = True
        for seg in g.latent_segments:
            if seg.positions is None or not bool((completion[b, seg.positions] == cfg.latent_pad_id).all()):
                raise ValueError(f"record {ids[b]!r}: latent segment positions do not match the generated steps")
            latents.append(seg.latents)
            features.append(seg.features)
    none = torch.zeros_like(inside)
    latent_mask = inside & (completion == cfg.latent_pad_id) if model.method.uses_latents else none
    forced = inside & (completion == cfg.latent_end_id) if model.method.uses_latents else none
    return Rollouts(
        prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"), completion_ids=completion.to(device),
        completion_mask=inside.to(device), text_mask=(inside & ~latent_mask & ~forced).to(device),
        latent_mask=latent_mask.to(device),
        latents=torch.cat(latents).to(device=device, dtype=model.dtype) if latents
        else torch.zeros(0, model.backbone.hidden_size, device=device, dtype=model.dtype),
        advantages=advantages.to(device), ids=list(ids),
        segment_features=[f if f is None else f.to(device) for f in features])


def banned_ids(model) -> list[int]:
    """Tokens generation never samples as text (latent pad, latent end): masked in the policy's text distribution."""
    cfg = model.method.config
    return [i for i in (cfg.latent_pad_id, cfg.latent_end_id) if i is not None] if model.method.uses_latents else []


def action_log_probs(model, r: Rollouts, temperature: float, sigma: float, score_latents: bool) -> torch.Tensor:
    """``(B, C)`` log-probability of every completion action under ``model`` (0 where no action): the sampled token
    under ``softmax(logits / temperature)``, the latent ``z_{q+1}`` under ``N(next_latent(h_q), sigma^2 I)`` with
    ``h_q`` the hidden state one position before the latent slot (the one that produced it).

    One forward over prompt + completion, built as generation built it: the prompt through ``embed_multimodal``,
    every generated step as a token embedding (a latent step: its sampled latent) at the next position id. Every call
    runs the vision tower, the LM head and (with ``score_latents``) the latent head whatever the batch holds (ZeRO-3).
    """
    backbone = model.backbone
    n, p = r.prompt_ids.shape
    embeds, visual = backbone.embed_multimodal(r.prompt_ids, r.pixel_values, r.image_grid_thw,
                                               uniform=model.uniform_compute)  # (B, P, hidden)
    positions = backbone.position_ids(r.prompt_ids, r.mm_token_type_ids, r.image_grid_thw, r.prompt_mask)
    next_pos = positions.reshape(-1, n, p).amax(dim=(0, 2)) + 1  # (B,): the first generated step's position
    steps = torch.cat([backbone.step_position_ids(next_pos + c) for c in range(r.completion_ids.shape[1])], dim=-1)
    slots = torch.cat([torch.zeros_like(r.prompt_mask, dtype=torch.bool), r.latent_mask], 1)  # (B, P + C)
    positions = model.place_latents(torch.cat([positions, steps], -1), slots)  # latent steps as generation put them
    b, c = r.latent_mask.nonzero(as_tuple=True)
    tail = backbone.embed_tokens(r.completion_ids).index_put((b, c), r.latents.to(embeds.dtype))  # (B, C, hidden)
    sequence = {"input_ids": torch.cat([r.prompt_ids, r.completion_ids], 1),
                "attention_mask": torch.cat([r.prompt_mask, r.completion_mask.long()], 1)}
    hidden = backbone(torch.cat([embeds, tail], 1), positions, model.decoder_mask(sequence, embeds.dtype),
                      visual=visual).last_hidden_state
    states = hidden[:, p - 1 : -1]  # (B, C, hidden): the state that produced each completion action
    log_probs = torch.zeros(r.text_mask.shape, dtype=torch.float32, device=hidden.device)

    logits = backbone.logits(states[r.text_mask]).float() / temperature  # (n_text, vocab)
    banned = banned_ids(model)
    if banned:
        logits[:, banned] = float("-inf")
    token_lp = logits.log_softmax(-1).gather(1, r.completion_ids[r.text_mask][:, None]).squeeze(1)
    log_probs = log_probs.index_put(r.text_mask.nonzero(as_tuple=True), token_lp)
    if score_latents:
        mu = model.method.policy_means(model, states[b, c], r)  # (n_latent, hidden), also when empty
        log_probs = log_probs.index_put((b, c), gaussian_log_prob(r.latents, mu, sigma))
    return log_probs


@dataclass
class VLPOOutput(ModelOutput):
    loss: torch.Tensor | None = None
    metrics: dict | None = None  # detached scalars for the logs


class VLPOModel(nn.Module):
    """The policy (a ``LatentVLM``) with the VLPO objective as its forward, so DeepSpeed's engine runs it. Saves,
    loads and checkpoints as the policy."""

    def __init__(self, policy, config: VLPOConfig):
        super().__init__()
        self.policy = policy
        self.vlpo = config

    def forward(self, r: Rollouts) -> VLPOOutput:
        c = self.vlpo
        log_probs = self.log_probs(r)
        mask = action_mask(r, c.score_latents)
        old = log_probs.detach() if r.old_log_probs is None else r.old_log_probs
        per_action, low, high = clipped_objective(log_probs, old, r.advantages[:, None].float(), c.epsilon, c.high,
                                                  c.delta)
        metrics = {}
        if c.beta > 0:
            kl = kl_k3(log_probs, r.ref_log_probs)
            per_action = per_action + c.beta * kl
            metrics["kl"] = _masked_mean(kl, mask)
        loss = aggregate(per_action, mask, c.loss_type, c.max_completion_length, r.normalizer)
        metrics.update({"clip_ratio/low_mean": _masked_mean(low, mask),
                        "clip_ratio/high_mean": _masked_mean(high, mask),
                        "clip_ratio/region_mean": _masked_mean(low | high, mask)})
        if c.score_latents:
            metrics["latent_log_prob"] = _masked_mean(log_probs, r.latent_mask)
        metrics["text_log_prob"] = _masked_mean(log_probs, r.text_mask)
        return VLPOOutput(loss=loss, metrics=metrics)

    def log_probs(self, r: Rollouts) -> torch.Tensor:
        c = self.vlpo
        return action_log_probs(self.policy, r, c.temperature, c.latent_sigma, c.score_latents)

    # what the Trainer reads off its model
    @property
    def config(self):
        return self.policy.config

    @property
    def device(self):
        return self.policy.device

    @property
    def lora(self):
        """The policy's LoRA settings (checkpoints merge the adapters, see ``LatentTrainer._save``)."""
        return getattr(self.policy, "lora", None)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs)

    def save_pretrained(self, out_dir, state_dict=None):
        if state_dict is not None:
            state_dict = {k.removeprefix("policy."): v for k, v in state_dict.items()}
        return self.policy.save_pretrained(out_dir, state_dict=state_dict)

    def load_weights(self, path):
        self.policy.load_weights(path)


def action_mask(r: Rollouts, score_latents: bool) -> torch.Tensor:
    """``(B, C)`` the actions in the objective: text tokens, latent steps with ``score_latents``, rows kept only."""
    mask = r.text_mask | r.latent_mask if score_latents else r.text_mask
    return mask if r.kept is None else mask & r.kept[:, None]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; nan when nothing is masked in (averaged out with nanmean in the logs)."""
    n = mask.sum()
    return (values.detach().float() * mask).sum() / n if n > 0 else values.new_tensor(float("nan"))


# ---------------------------------------------------------------------------------------------------------------------
# The trainer


class GroupSampler(Sampler):
    """Dataset indices for VLPO: each prompt ``num_generations`` times in a row (its group), prompts shuffled; each
    ``window`` of prompts (one rollout batch on all processes) comes ``repeats`` times in a row (once per micro-step
    it serves, as TRL's ``RepeatSampler``), so each process's data-loader batch is its whole share of the rollout
    batch at every micro-step. Incomplete windows are dropped."""

    def __init__(self, size: int, num_generations: int, window: int, repeats: int, seed: int):
        self.size, self.num_generations, self.window, self.repeats = size, num_generations, window, repeats
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator).tolist()
        for start in range(0, self.size - self.window + 1, self.window):
            chunk = order[start : start + self.window]
            for _ in range(self.repeats):
                for index in chunk:
                    yield from [index] * self.num_generations

    def __len__(self) -> int:
        return (self.size // self.window) * self.window * self.num_generations * self.repeats


def _records(batch: list[dict]) -> list[dict]:
    """The collator: VLPO's batches are the records themselves (rollouts are built in ``_prepare_inputs``)."""
    return batch


class VLPOTrainer(LatentTrainer):
    """VLPO on ``transformers.Trainer`` (+ DeepSpeed): rollouts in ``_prepare_inputs``, the objective in
    ``VLPOModel.forward``. ``model``: a ``LatentVLM``; ``train_dataset``: records (``vlatent.data.load_records``)."""

    def __init__(self, model, args, vlpo: VLPOConfig, train_dataset: list[dict], ref_model=None, **kwargs):
        vlpo.validate()
        if args.per_device_train_batch_size % vlpo.num_generations:
            raise ValueError(f"per_device_train_batch_size={args.per_device_train_batch_size} must be a multiple of "
                             f"num_generations={vlpo.num_generations} (a group of rollouts lives on one process)")
        if vlpo.score_latents and not model.method.uses_latents:
            raise ValueError(f"method {model.method.name!r} has no latent steps to score: set score_latents: false "
                             "(text-only GRPO)")
        if vlpo.score_latents and model.method.vlpo_refusal:
            raise ValueError(f"method {model.method.name!r}: VLPO cannot score its latents: "
                             f"{model.method.vlpo_refusal}; set score_latents: false (text-only GRPO)")
        if vlpo.prefix and not model.method.uses_latents and model.method.config.latent_start_token in vlpo.prefix:
            raise ValueError(f"method {model.method.name!r} has no latent tokens; prefix cannot open a latent segment")
        if vlpo.score_latents and not vlpo.latent_exploration and not vlpo.off_policy:
            logger.warning("latent_exploration is off and every rollout batch serves one update: rollouts feed z = mu, "
                           "so the latent term of the objective never has a gradient (set updates_per_rollout or "
                           "num_iterations > 1, as released, or latent_exploration: true)")
        self.vlpo = vlpo
        self.reward_funcs = [get_reward(name) for name in vlpo.reward_funcs]
        self.reward_weights = torch.tensor(vlpo.reward_weights or [1.0] * len(vlpo.reward_funcs))
        if vlpo.beta > 0 and ref_model is None:
            if any(hasattr(p, "ds_id") for p in model.parameters()):
                raise ValueError("the model was loaded partitioned (ZeRO-3 init): pass ref_model= a full replica")
            ref_model = copy.deepcopy(model)  # the frozen initial policy, a full replica on every process
        self.ref_model = ref_model.eval().requires_grad_(False) if ref_model is not None else None
        super().__init__(model=VLPOModel(model, vlpo), args=args, train_dataset=train_dataset,
                         data_collator=_records, **kwargs)
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        self._buffer: list[Rollouts] = []  # the micro-batches of the current rollout batch
        self._buffer_for: list = []  # the ids of the data-loader batch they were made for
        self._micro = 0
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._warned_no_latents = False
        self._stated_noise = False
        seed = args.seed + 1_000_003 * args.process_index
        self._rng = torch.Generator(device=self.args.device).manual_seed(seed)  # rollout sampling
        self._rng_at_batch = torch.Generator(device=self.args.device).manual_seed(seed)  # its state at the batch start

    def generators(self):
        policy = self.accelerator.unwrap_model(self.model).policy
        return {**policy.method.generators(), "vlpo/rollouts": self._rng, "vlpo/rollouts_at_batch": self._rng_at_batch}

    # -- data ------------------------------------------------------------------------------------------
    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator  # rewards read every column of the records

    @property
    def _micro_batches(self) -> int:
        """Micro-batches per process in one rollout batch: ``updates_per_rollout x gradient_accumulation_steps``."""
        return self.vlpo.updates_per_rollout * self.args.gradient_accumulation_steps

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        c, a = self.vlpo, self.args
        prompts = a.per_device_train_batch_size // c.num_generations
        window = prompts * a.world_size * self._micro_batches
        if len(dataset) < window:
            raise ValueError(f"{len(dataset)} records, but one rollout batch takes {window} prompts "
                             f"({prompts} per process x {a.world_size} processes x {a.gradient_accumulation_steps} "
                             f"accumulation steps x updates_per_rollout={c.updates_per_rollout})")
        return GroupSampler(len(dataset), c.num_generations, window, self._micro_batches * c.num_iterations, a.seed)

    def get_train_dataloader(self) -> DataLoader:
        """Each batch is the process's whole share of a rollout batch (the same one for each micro-step it serves);
        ``_prepare_inputs`` generates it once and hands out one micro-batch per micro-step."""
        return self._get_dataloader(self.train_dataset, "Training", self._train_batch_size * self._micro_batches,
                                    self._get_train_sampler, is_training=True)

    # -- rollouts --------------------------------------------------------------------------------------
    def _prepare_inputs(self, records: list[dict]) -> Rollouts:
        """The rollouts of this micro-step. At the first micro-step of a rollout batch (or the first after a resume)
        all of its micro-batches are generated and scored by the current policy; the optimizer steps of the batch
        then take them in order: ``num_iterations`` passes of ``updates_per_rollout`` mini-batches. A run resumed in
        the middle of a batch regenerates it from the pool prompts and the sampler state the batch began with, with
        the resumed policy (the rollouts themselves are not checkpointed); at a batch boundary a resume is exact."""
        c, accumulation = self.vlpo, self.args.gradient_accumulation_steps
        step = self.state.global_step % (c.updates_per_rollout * c.num_iterations)
        index = (step % c.updates_per_rollout) * accumulation + self._micro % accumulation
        self._micro += 1
        if (step == 0 and index == 0) or not self._buffer:  # not self._buffer: resumed in the middle of the batch
            if step or index:  # resumed mid-batch: redraw the batch from its own start (prompts and random stream)
                self._rng.set_state(self._rng_at_batch.get_state())
            self._rng_at_batch.set_state(self._rng.get_state())
            first = self.state.global_step - step  # the optimizer step this rollout batch began at
            self._buffer, self._buffer_for = self._rollout_batch(records, first), [r["id"] for r in records]
        if self._buffer_for != [r["id"] for r in records]:
            raise RuntimeError(f"rollout reuse out of step: rollouts made for {self._buffer_for[:2]}..., got "
                               f"{[r['id'] for r in records][:2]}... (was the sampler replaced?)")
        return self._buffer[index]

    def _rollout_batch(self, records: list[dict], first: int) -> list[Rollouts]:
        """The micro-batches of one rollout batch, from the data loader's ``records`` (with ``difficulty_pool > 1``
        refilled with kept groups: see the module docstring). ``first``: the optimizer step the batch began at."""
        c, per_device, g = self.vlpo, self.args.per_device_train_batch_size, self.vlpo.num_generations
        if c.difficulty_pool == 1:
            start = time.perf_counter()
            batch = self._scale([self._score(records[i : i + per_device]) for i in range(0, len(records), per_device)])
            shared = (time.perf_counter() - start) / len(batch)  # generating and scoring, per micro-batch
            return [self._finish(self._build(s), time.perf_counter(), shared) for s in batch]
        start, needed = time.perf_counter(), len(records) // g  # groups in the batch
        rows = records + self._pool_records((c.difficulty_pool - 1) * needed, records, first)
        pool = []  # Scored groups, in generation order
        for i in range(0, len(rows), per_device):
            pool += self._score(rows[i : i + per_device]).groups(g)
            if not self._any(sum(bool(s.kept[0]) for s in pool) < needed):  # every process runs as many rounds
                break
        kept = [s for s in pool if s.kept[0]][:needed]
        short = needed - len(kept)
        m = self._metrics
        m["difficulty/pool_prompts"].append(float(len(pool)))
        m["difficulty/shortfall"].append(float(short))
        if short:
            logger.warning(f"difficulty pool: {len(kept)} of {len(pool)} prompts kept, {needed} needed: {short} "
                           "groups of the batch filled with dropped ones, masked out")
        groups = kept + [s for s in pool if not s.kept[0]][:short]
        per_batch = per_device // g
        batch = self._scale([Scored.cat(groups[i : i + per_batch]) for i in range(0, needed, per_batch)])
        shared = (time.perf_counter() - start) / len(batch)  # generating and scoring, per micro-batch
        return [self._finish(self._build(s), time.perf_counter(), shared) for s in batch]

    def _pool_records(self, n: int, taken: list[dict], first: int) -> list[dict]:
        """``n`` prompts of the train dataset for the difficulty pool, each ``num_generations`` times: a seeded random
        order (the same for a (seed, process, first step of the rollout batch), also when a run resumed in the middle
        of the batch regenerates it), the prompts in ``taken`` left out."""
        a, dataset, ids = self.args, self.train_dataset, {r["id"] for r in taken}
        generator = torch.Generator().manual_seed((a.seed * 1_000_003 + a.process_index) * 1_000_003 + first)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        order = [i for i in order if dataset[i]["id"] not in ids] or order  # all taken: a one-batch dataset
        return [dataset[order[k % len(order)]] for k in range(n) for _ in range(self.vlpo.num_generations)]

    def _any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (so that all of them take the same branch)."""
        if self.args.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.args.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def rollout(self, records: list[dict]) -> Rollouts:
        """Generate one completion per record (the records come in groups), score them, and build the batch (a
        rollout batch of one micro-batch)."""
        start = time.perf_counter()
        return self._finish(self._build(self._scale([self._score(records)])[0]), start)

    def _scale(self, batch: list[Scored]) -> list[Scored]:
        """``scale_rewards: batch``: every micro-batch's centred advantages over the std of the whole rollout batch's
        rewards on all processes (TRL's generation batch; the rows the difficulty filter keeps, when it keeps any)."""
        if self.vlpo.scale_rewards == "batch":
            rewards = self._gather(torch.cat([s.rewards for s in batch]))  # every process has as many rows
            kept = self._gather(torch.cat([torch.ones_like(s.rewards) if s.kept is None else s.kept.float()
                                           for s in batch])) > 0  # gloo gathers no bool
            std = (rewards[kept] if kept.any() else rewards).std()
            for s in batch:
                s.advantages = s.advantages / (std + 1e-4)
        return batch

    @torch.no_grad()
    def _score(self, records: list[dict]) -> Scored:
        """Generate one completion per record, score them and log them (the difficulty filter's verdicts too)."""
        c, policy = self.vlpo, self.accelerator.unwrap_model(self.model).policy
        start = time.perf_counter()
        prompts, images = zip(*(record_prompt(r) for r in records))
        images, prompts, prefixes = normalize_inputs(list(images), list(prompts), c.prefix)
        ids = [r["id"] for r in records]
        policy.eval()
        try:
            generations = policy.generate(
                images, prompts, max_new_tokens=c.max_completion_length, do_sample=True, temperature=c.temperature,
                top_p=c.top_p, latent_steps=c.latent_steps, prefix=prefixes, generator=self._rng,
                latent_sigma=c.latent_sigma if c.latent_exploration else 0.0, synced=self.args.world_size > 1)
        finally:
            policy.train()
        generation_s = time.perf_counter() - start

        completions = ["".join(s.text for s in g.segments if isinstance(s, TextSegment)) for g in generations]
        meta = [r.get("meta") or {} for r in records]
        columns = {"prompts": list(prompts), "generations": generations, "id": ids,
                   "answer": [r.get("answer") for r in records], "task": [r.get("task") for r in records],
                   "options": [m.get("options") for m in meta], "question_type": [m.get("question_type") for m in meta],
                   "meta": meta}
        table = torch.tensor(score_completions(self.reward_funcs, c.reward_funcs, completions, columns))  # (B, F)
        rewards = (table * self.reward_weights).nansum(1)  # (B,)
        # "batch": centred here, divided by the whole rollout batch's std once it is complete (``_scale``)
        advantages = group_advantages(rewards, c.num_generations, "none" if c.scale_rewards == "batch" else
                                      c.scale_rewards)
        scored = Scored(list(records), images, prompts, prefixes, list(generations), advantages, rewards, None)
        if c.difficulty_filter:
            column = c.reward_funcs.index(c.difficulty_reward) if c.difficulty_reward else 0
            keep = difficulty_keep(table[:, column], c.num_generations, c.difficulty_threshold)  # (n_groups,)
            scored.kept = keep.repeat_interleave(c.num_generations)
            self._metrics["difficulty/groups_dropped"].append(float((~keep).sum()))
            self._metrics["difficulty/groups_kept"].append(float(keep.sum()))
        self._log_rollouts(rewards, table, generations, generation_s)
        return scored

    def _build(self, s: Scored) -> Rollouts:
        """The micro-batch of ``s``'s rows, its rows' filter verdicts as ``kept``; logs its actions."""
        policy = self.accelerator.unwrap_model(self.model).policy
        r = build_rollouts(policy, s.images, s.prompts, s.prefixes, s.generations, s.advantages,
                           [x["id"] for x in s.records])
        r.kept = None if s.kept is None else s.kept.to(r.text_mask.device)
        m, n = self._metrics, len(s.generations)
        m["completions/text_tokens"].append(r.text_mask.sum().item() / n)
        m["completions/latent_steps"].append(r.latent_mask.sum().item() / n)
        if self.vlpo.score_latents and not r.latent_mask.any() and not self._warned_no_latents:
            self._warned_no_latents = True
            logger.warning("score_latents is on but these rollouts hold no latent step: this batch trains the text "
                           "only (the model opened no latent segment; a prefix ending in the latent start token "
                           "forces one)")
        return r

    @torch.no_grad()
    def _finish(self, r: Rollouts, since: float, shared: float = 0.0) -> Rollouts:
        """What the objective needs beyond the rollouts: the ``dapo`` normaliser, the rollout policy's and the
        reference's log-probs. Logs the time since ``since`` plus ``shared`` (this batch's share of the pool's)."""
        c = self.vlpo
        mask = action_mask(r, c.score_latents)
        if c.loss_type == "dapo":
            r.normalizer = float(self._gather(mask.sum().float().reshape(1)).mean())
        if c.off_policy:  # the policy that generated: frozen for the later updates
            r.old_log_probs = self.accelerator.unwrap_model(self.model).log_probs(r)
        if c.beta > 0:
            r.ref_log_probs = action_log_probs(self.ref_model, r, c.temperature, c.latent_sigma, c.score_latents)
        self._metrics["time/rollout_s"].append(shared + time.perf_counter() - since)  # generation to ref log-probs
        return r

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` from every process, concatenated (``t`` itself with one process)."""
        if self.args.world_size == 1:
            return t
        t = t.to(self.args.device)
        parts = [torch.empty_like(t) for _ in range(self.args.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts).cpu()

    def _log_rollouts(self, rewards, table, generations, generation_s) -> None:
        g = self.vlpo.num_generations
        groups = rewards.view(-1, g)
        m = self._metrics
        m["reward"].append(rewards.mean().item())
        m["reward_std"].append(groups.std(1).mean().item())
        m["frac_reward_zero_std"].append((groups.std(1) < 1e-6).float().mean().item())
        for name, column in zip(self.vlpo.reward_funcs, table.T):
            m[f"rewards/{name}/mean"].append(column.nanmean().item())
        m["completions/mean_length"].append(sum(x.num_steps for x in generations) / len(generations))
        means = [s.means for g in generations for s in g.latent_segments]
        if means:  # the scale exploration noise is judged against
            norm = torch.cat(means).float().norm(dim=-1).mean().item()
            m["latents/mean_norm"].append(norm)
            if self.vlpo.latent_exploration:
                noise = self.vlpo.latent_sigma * math.sqrt(means[0].shape[-1])
                m["latents/noise_norm"].append(noise)
                if not self._stated_noise and self.is_world_process_zero():
                    self._stated_noise = True
                    logger.warning(f"latent exploration: sigma={self.vlpo.latent_sigma} per dimension, noise norm "
                                   f"sigma*sqrt(d)={noise:.3g} = {noise / max(norm, 1e-12):.3g} x the measured norm of "
                                   f"the latent means |mu|={norm:.3g}")
        m["time/generation_s"].append(generation_s)  # the decode loop

    # -- the update ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs: Rollouts, return_outputs=False, num_items_in_batch=None):
        out = model(inputs)
        for name, value in out.metrics.items():
            self._metrics[name].append(float(value))
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:  # a training log: means since the last one, over all processes
            names = sorted(self._metrics)
            local = torch.tensor([[torch.tensor(self._metrics[n]).nanmean().item() for n in names]],
                                 device=self.args.device)
            every = nested_gather(local, self.args.parallel_mode).reshape(-1, len(names)).nanmean(0)
            logs.update({n: round(v, 4) for n, v in zip(names, every.tolist()) if v == v})
            self._metrics.clear()
        super().log(logs, start_time)
