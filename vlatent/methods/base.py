"""The method protocol: what every latent-reasoning method declares, and the registry that builds one by name.

A method owns (1) its special tokens, (2) its extra modules, (3) how latent slots are filled and which
named losses it trains during SFT, and (4) how it produces the next latent at inference. ``LatentVLM``
wires a method to a backbone adapter; trainers, evaluators and the demo only talk to ``LatentVLM``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..configs import from_dict

if TYPE_CHECKING:
    from ..model import LatentVLM


LATENT_STEPS = ("fixed", "auto", "model")  # how a latent segment ends at inference (``MethodConfig.latent_steps``)


@dataclass
class LatentTokens:
    """The three strings that delimit a latent segment: ``start pad*K end``."""

    start: str = "<|latent_start|>"
    pad: str = "<|latent_pad|>"
    end: str = "<|latent_end|>"

    def segment(self, k: int) -> str:
        return self.start + self.pad * k + self.end


@dataclass
class LatentContext:
    """What a method may look at, besides the last hidden state, to produce the next latent at inference."""

    rows: torch.Tensor  # (m,) batch rows that take a latent this step
    step: torch.Tensor  # (m,) index of this latent within its segment (0 = first after the start token)
    state: Any = None  # what ``method.generation_state`` returned for this batch (mutable; the method owns it)


@dataclass
class MethodConfig:
    """Fields every method has. Token ids are resolved against the tokenizer when the method is wired to a
    model and saved with it; nothing downstream hard-codes an id."""

    num_latent_tokens: int = 4  # K: latent vectors per latent segment
    latent_start_token: str = "<|latent_start|>"
    latent_pad_token: str = "<|latent_pad|>"
    latent_end_token: str = "<|latent_end|>"
    latent_start_id: int | None = None
    latent_pad_id: int | None = None
    latent_end_id: int | None = None
    stage: int = 1
    # how a latent segment ends at inference (``generate``'s default; see ``LATENT_STEPS``): "fixed" exactly K latents,
    # "auto" the LM head's argmax end token (at least 1, at most 2K), "model" the head's sampled / argmax end token
    # from the first step on, at most ``max_latent_steps`` latents (as Mirage's and Monet's releases decode)
    latent_steps: str = "fixed"
    max_latent_steps: int | None = None  # "model": the most latents in a segment (None: 2K)
    # everything after a row's first latent start (text and latent slots, not the start tokens that produce each
    # segment's first latent) sees only what follows that start: what it knows of the question and the picture comes
    # as the latent vectors fed in (``bottleneck_spans``); a probe of whether latents carry the example, in training
    # and at inference alike; not in any paper
    latent_bottleneck: bool = False

    def __post_init__(self):
        if self.latent_steps not in LATENT_STEPS:
            raise ValueError(f"latent_steps must be one of {', '.join(LATENT_STEPS)}, got {self.latent_steps!r}")
        if self.max_latent_steps is not None and not (isinstance(self.max_latent_steps, int)
                                                      and self.max_latent_steps >= 1):
            raise ValueError(f"max_latent_steps must be a positive integer or null, got {self.max_latent_steps!r}")

    @property
    def latent_cap(self) -> int:
        """The most latents a segment holds under ``latent_steps="model"``."""
        return self.max_latent_steps if self.max_latent_steps is not None else 2 * self.num_latent_tokens

    @property
    def latent_tokens(self) -> LatentTokens:
        return LatentTokens(self.latent_start_token, self.latent_pad_token, self.latent_end_token)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        return from_dict(cls, d, cls.__name__)


class LatentMethod(nn.Module):
    """Base class of all methods. Subclasses set ``name`` and ``config_class`` and override the hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_latents: ClassVar[bool] = True
    stages: ClassVar[tuple[int, ...]] = (1,)  # the training stages ``config.stage`` may name
    # why VLPO cannot score this method's latents as Gaussian actions around ``next_latent(h)`` (None: it can)
    vlpo_refusal: ClassVar[str | None] = None

    def __init__(self, config: MethodConfig, hidden_size: int):
        super().__init__()
        if config.latent_bottleneck and not self.uses_latents:
            raise ValueError(f"latent_bottleneck hides what precedes a row's first latent segment from what follows "
                             f"it, and method {self.name!r} has no latent segments")
        self.config = config
        self.hidden_size = hidden_size

    @classmethod
    def backbone_config(cls, config: dict, backbone, processor) -> dict:
        """Fill the config fields this method reads off the backbone (e.g. the vision feature width; explicit values
        win) and refuse values that do not fit it (a wrong width or count), before any module is built."""
        return config

    # -- tokens -------------------------------------------------------------------------------------
    def special_tokens(self) -> list[str]:
        """Tokens this method adds to the vocabulary (in this order)."""
        if not self.uses_latents:
            return []
        t = self.config.latent_tokens
        return [t.start, t.pad, t.end]

    def resolve_token_ids(self, tokenizer) -> None:
        """Record the tokenizer's ids of the latent tokens in the config (saved with the checkpoint)."""
        if not self.uses_latents:
            return
        c = self.config
        for attr, tok in (("latent_start_id", c.latent_start_token), ("latent_pad_id", c.latent_pad_token),
                          ("latent_end_id", c.latent_end_token)):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"token {tok!r} of method {self.name!r} is not in the tokenizer")
            setattr(c, attr, int(tid))

    # -- data ---------------------------------------------------------------------------------------
    def latent_mode(self) -> str:
        """What the collator puts where a record has ``{"type": "latent"}``: ``"latent"`` (a latent segment with
        the helper image as its target), ``"image"`` (the real helper image inline) or ``"drop"`` (nothing)."""
        return "latent"

    def collator_kwargs(self) -> dict:
        """Extra ``InterleavedCollator`` arguments this method (and stage) needs."""
        return {}

    def training_data(self, records: list[dict], seed: int = 0) -> tuple[Any, Any]:
        """What the Trainer iterates, built from the validated records, and its sampler (``None``: the Trainer's own
        shuffling). Perception's curriculum returns on-the-fly views of the records and a scheduled sampler;
        Sketchpad's stage 1 turns a share of them, drawn from ``seed`` (``training.seed``), into text-only views."""
        return records, None

    # -- files beside the checkpoint ----------------------------------------------------------------
    def save_files(self, out_dir: Path) -> None:
        """Write what the method keeps beside a checkpoint besides its weights (perception: its depth tokenizer in
        ``decoder/``); called by ``LatentVLM.save_pretrained`` before the config is written."""

    def load_files(self, checkpoint: Path) -> None:
        """Pick up what ``save_files`` wrote; called when a saved checkpoint is loaded, before the token ids resolve."""

    # -- training -----------------------------------------------------------------------------------
    def training_losses(self, model: "LatentVLM", batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted named losses for one batch (each logged on its own)."""
        raise NotImplementedError

    def loss_weights(self) -> dict[str, float]:
        """Weight of each named loss in the total; names missing here weigh 1."""
        return {}

    def generators(self) -> dict[str, torch.Generator]:
        """The method's own random generators that training draws from (Sketchpad's re-rendering counts), by name:
        checkpoints keep their states so that a resumed run draws what the uninterrupted one draws."""
        return {}

    # -- inference ----------------------------------------------------------------------------------
    def generation_state(self, model: "LatentVLM", batch: dict[str, torch.Tensor]) -> Any:
        """Per-batch state built once after the prompt is encoded (e.g. the input images' features), handed to
        ``next_latent`` as ``context.state``. ``batch`` holds the encoded prompt (input_ids, pixel_values, ...)."""
        return None

    def next_latent(self, hidden: torch.Tensor, context: LatentContext | None = None) -> torch.Tensor:
        """The next latent input from the last position's final hidden state. ``(m, hidden) -> (m, hidden)``.
        ``context`` is given at inference (``None`` in training)."""
        raise NotImplementedError(f"method {self.name!r} does not generate latents")

    def latent_positions(self, backbone) -> torch.Tensor | None:
        """Where a latent segment's K slots sit from its first one, as ``backbone.image_positions`` of the image the
        segment stands for (sketchpad's sketches), text after it continuing at their largest + 1; ``None`` (here):
        text positions, one per slot."""
        return None

    def policy_means(self, model, hidden: torch.Tensor, rollouts) -> torch.Tensor:
        """VLPO: the Gaussian means of a rollout's latent steps ``(n_latent, hidden)`` from the states that produced
        them (row-major, as ``rollouts.latent_mask``), as ``next_latent`` gave them in generation."""
        return self.next_latent(hidden)

    def constrain_logits(self, logits: torch.Tensor, state: Any) -> torch.Tensor:
        """Restrict the next text token at inference, ``(n, vocab) -> (n, vocab)`` (e.g. -inf on tokens a row may
        not emit now). ``state`` is what ``generation_state`` returned."""
        return logits

    def observe_tokens(self, tokens: torch.Tensor, state: Any) -> None:
        """Called at inference with the tokens ``(n,)`` just chosen for every row, for methods whose
        ``constrain_logits`` depends on what was generated (perception: position inside a code segment)."""

    def segment_features(self, state: Any, row: int) -> torch.Tensor | None:
        """A method-space view of the latent segment row ``row`` has just finished (sketchpad: its ViT-space latents),
        stored as ``LatentSegment.features``; ``None`` when the method has none."""
        return None


_METHODS: dict[str, type[LatentMethod]] = {}


def bottleneck_spans(input_ids: torch.Tensor, latent_start_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent_bottleneck``'s two (batch, seq) bool masks: the keys hidden and the queries blind to them. Blind: every
    position after a row's first latent start but the start tokens (the latent slots included). Hidden: everything up
    to and including that start, and every later start token (the starts' states produce each segment's first latent,
    so they read the whole context). A blind position thus sees only blind positions: the question reaches it only as
    the latent vectors fed in (what a swap replaces), and, positions being relative, not even the length of what came
    before. A row without a latent segment hides nothing."""
    length = input_ids.shape[1]
    idx = torch.arange(length, device=input_ids.device)
    starts = input_ids == latent_start_id
    first_start = torch.where(starts, idx, length).amin(1, keepdim=True)  # (batch, 1)
    return (idx <= first_start) | starts, (idx > first_start) & ~starts


def bottleneck_allowed(input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_start_id: int) -> torch.Tensor:
    """(batch, seq, seq) bool, True where query row may attend to key column: causal, no padded keys, and
    ``bottleneck_spans``' keys hidden from its queries."""
    length = input_ids.shape[1]
    hidden_keys, blind = bottleneck_spans(input_ids, latent_start_id)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    return causal & attention_mask.bool()[:, None, :] & ~(blind[:, :, None] & hidden_keys[:, None, :])


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (batch, seq, seq) -> additive (batch, 1, seq, seq) in ``dtype``: 0 where allowed, the dtype's min else
    (finite, so rows with nothing to see stay NaN-free)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def slot_means(targets: torch.Tensor, k: int) -> torch.Tensor:
    """``(..., n, hidden)`` targets, K per segment in order along ``n`` -> each one's batch mean over the targets at its
    slot index (the j-th of K in every segment), detached: what ``centre_targets`` options subtract."""
    index = torch.arange(targets.shape[-2], device=targets.device) % k
    means = torch.stack([targets[..., index == j, :].mean(-2) for j in range(k)], dim=-2)  # (..., k, hidden)
    return means[..., index, :].detach()


def register_method(cls: type[LatentMethod]) -> type[LatentMethod]:
    """Class decorator: make a method available to ``create_method(cls.name, ...)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[LatentMethod]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(list_methods())}")
    return _METHODS[name]


def create_method(name: str, hidden_size: int, config: MethodConfig | dict | None = None, **overrides) -> LatentMethod:
    """Build a registered method: ``create_method("mirage", hidden_size=3584, num_latent_tokens=4)``."""
    cls = method_class(name)
    if isinstance(config, MethodConfig):
        cfg = dataclasses.replace(config, **overrides) if overrides else config
    else:
        cfg = cls.config_class.from_dict({**(config or {}), **overrides})
    return cls(cfg, hidden_size)
