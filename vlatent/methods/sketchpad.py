"""Latent Sketchpad: Sketching Visual Thoughts to Elicit Multimodal Reasoning in MLLMs (arXiv 2510.24514).

The model sketches in the vision encoder's own feature space. A latent segment ``start pad*K end`` is one sketch: its
K latent tokens are the K LM tokens of a ``sketch_size`` x ``sketch_size`` image. A context-aware **vision head**
turns the LM's last hidden state before each slot into that slot's ViT-space latents, attending causally to the
latents already produced for the current sketch and to the *global context* (the ViT features of the input images and
of the earlier sketches of the same answer); the latents re-enter the LM through the backbone's own merger /
projector (``backbone.project_vision_features``), exactly as a real image's ViT features would.

A sketch sits in the sequence as the image it stands for: its K slots take the positions the backbone gives the
tokens of a ``sketch_size`` image (``latent_positions``: M-RoPE rows and columns on Qwen, consecutive on the 1-D
families), and the text after it continues where the family continues after such an image, in training and in
generation alike.

K latent LM tokens <-> ViT vectors: one LM token is what the merger fuses from ``features_per_token`` ViT vectors
(Qwen2.5-VL: a 2 x 2 patch unit, 4 x 1280 -> 3584), so a sketch is ``K * features_per_token`` ViT vectors, grouped
per token in the order ``backbone.vision_features`` returns them. The head maps each hidden state to its token's
``features_per_token`` vectors (an MLP, as released: hidden -> hidden -> 4 x 1280), then refines them with blocks
of [causal cross-attention to (global context ; local latents), causal self-attention over the local latents, MLP].
Every context vector and every latent has a place in its picture (``grid_coords``), and the cross-attention prefers
keys near the query's place, so the head can copy what stands at a place in the question image to the same place of
the sketch.

Two stages, as released (``scripts/train_stage{1,2}.sh``):
1. Fine-tune the backbone on the interleaved data: each latent slot holds the ground-truth sketch (the helper image's
   ViT features through the merger, teacher forced), text CE only; the vision head is frozen (image loss weight 0).
   The LM learns to open a sketch (``<|latent_start|>`` is supervised) and to reason from it.
   ``head_in_stage1`` (not the release's) trains the head beside it, on the states detached (ViT-space L1 only).
2. Freeze the backbone (recipe ``freeze_*``) and train the vision head, the slots again holding the ground truth:
   ``vit_weight * L1(head, target ViT features) + embed_weight * L1(merger(head), merger(target))`` — the released
   ``loss_type l1`` (both spaces), text weight 0 (``ce_weight`` > 0 adds text CE).

Generation "multimodal" (the default): when the model writes ``<|latent_start|>`` the vision head fills the K slots,
one per step on the KV cache (the head itself is re-run over the current sketch's <= K tokens, a few small layers).
"Text only": ``model.generate(..., allow_latents=False)`` never opens a sketch, so the same checkpoint reasons in
text alone (the paper's backbone comparison; the release's ``GENERATION_TYPE``). Each ``LatentSegment.features``
holds the sketch's ``(K * features_per_token, d_v)`` ViT-space latents, which ``vlatent.decoders.SketchDecoder``
renders as an image.

Options that select the release's behaviour (``docs/fidelity.md``): ``head_target="merger_norm"`` regresses (and
hands the decoder) the sketch after the merger's norm, ``supervise_sketch_delimiters=False`` leaves the sketch's start
/ end tokens out of the CE, ``text_only_share=0.5`` trains stage 1 on that share of records without their sketches,
``augment_sketches=2`` with a trained ``augment_decoder`` feeds each teacher-forced sketch re-rendered 0-2 times through
the sketch decoder and the ViT (the release's ``--augment``), its targets staying the true sketch.

Choices the paper leaves open (or where the release is not followed):
- Targets are the raw ViT output before the merger by default (``head_target="vit"``; the release first applies the
  merger's RMSNorm); the merger still normalises on the way into the LM. The head's output has a free scale.
- Global context = ViT features of the input images and of earlier sketches (targets in training, the head's own
  latents at inference); the release feeds the input images' merged embeddings through the head's MLP instead.
- Places: each context vector and each latent has its (row, col) centre in its own picture, scaled to [0, 1], and
  each cross-attention head takes ``exp(locality) * squared distance`` off its logits (a 2-D ALiBi; heads start from
  nearly place-blind to one cell of a 4 x 4 grid), so a sketch cell lines up with the same cell of a question image
  of any size. The release numbers its packed prefix and sketch 1-D (a learned embedding and rotary over the sequence
  index, ``model/perceiver.py:245, 273-277``), which lines up only images of one fixed size. Without places the
  context is a set: the tiny head drew one average maze for every input (decoded path IoU 0.09-0.11 against the
  example's own helper images and against another example's alike).
- Helper images are resized to exactly ``sketch_size`` px (collator ``latent_target_size``), so every sketch is one
  fixed grid; the release fixes 256 tokens (448 px) likewise.
- A sketch is forced to exactly K latents: use ``latent_steps="fixed"`` (the default) at inference.
- ``changed_weight`` (0, as released) weights the head's ViT-space L1 towards the vectors a row's later sketch changes
  from its previous one (a maze step's new route cells): under the plain mean the tiny head learned to copy.
- VLPO (not in the paper) scores each sketch latent as a Gaussian around the head's output, re-run over the sketch's
  states with the context generation gave it (``policy_means``).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .base import LatentContext, LatentMethod, MethodConfig, register_method

@dataclass
class SketchpadConfig(MethodConfig):
    num_latent_tokens: int | None = None  # K: LM tokens of one sketch; read off the backbone and sketch_size
    sketch_size: int = 448  # helper images (ground-truth sketches) are resized to sketch_size x sketch_size px
    vision_feature_size: int | None = None  # d_v, the ViT width before the merger; read off the backbone
    features_per_token: int | None = None  # ViT vectors the merger fuses into one LM token; read off the backbone
    sketch_grid_thw: list[int] | None = None  # the family's image_grid_thw row of one sketch; read off the backbone
    head_layers: int = 2  # vision-head blocks (release: 2 cross-attention + 8 self-attention layers)
    head_heads: int = 16  # attention heads of the vision head; must divide vision_feature_size
    ce_weight: float = 0.0  # stage-2 text CE weight (release: 0; stage 1 trains CE at weight 1)
    vit_weight: float = 1.0  # stage-2 L1 in ViT space
    embed_weight: float = 1.0  # stage-2 L1 after the merger (LM space)
    # CE on the sketch's start / end tokens; the release leaves them out (data/dataset.py:241-242) and forces its
    # start token by a rule at inference, so without them the model never opens a sketch on its own
    supervise_sketch_delimiters: bool = True
    text_only_share: float = 0.0  # stage 1: share of records trained without their sketches (release: 0.5)
    head_target: str = "vit"  # "vit": raw ViT features; "merger_norm": after the merger's norm (release)
    # the release's --augment: in training (not in eval mode) the slots hold each sketch re-rendered k times, k uniform
    # in 0..augment_sketches, through augment_decoder (a folder train/sketch_decoder.py wrote for this ViT at
    # sketch_size) and the ViT; the head's targets stay the true sketch; 0: off
    augment_sketches: int = 0  # release: 2
    augment_decoder: str | None = None
    # stage 1 also trains the vision head (ViT-space L1 at vit_weight) on the backbone's states and features detached,
    # so no gradient of it reaches the backbone and stage 2 starts from a head that draws; release: frozen in stage 1
    head_in_stage1: bool = False
    # > 0 (not the release's): in the head's L1 each vector of a row's later sketch counts 1 + changed_weight x its
    # change from the same place of the row's previous sketch over the batch's mean change, so the few cells a step
    # adds (the new stretch of a route) outweigh the many it copies; 0: a plain mean, as released
    changed_weight: float = 0.0
    # with head_in_stage1 (not the release's): the head's loss also trains the backbone through the LM states before
    # the slots that the head reads (as CE does), so stage 1 teaches them what the sketch must show; its targets and
    # context stay detached
    head_trains_states: bool = False


HEAD_TARGETS = ("vit", "merger_norm")


@dataclass
class SketchAugmenter:
    """``augment_sketches``' decoder (off the module tree: never trained, moved or saved with the model) and the
    generator of how many times each sketch is re-rendered."""

    decoder: nn.Module  # vlatent.decoders.SketchDecoder
    generator: torch.Generator
    most: int

    def rounds(self, n: int) -> list[int]:
        """Re-renderings of each of ``n`` sketches, uniform in 0..most."""
        return torch.randint(self.most + 1, (n,), generator=self.generator).tolist()


def text_only(record: dict) -> dict:
    """The release's stage-1 text-only sample (``data/dataset.py:176-181``): every sketch and every image of the
    answer goes, of the other turns' images only the first stays; the text around them stays as written."""
    out, kept_image = copy.deepcopy(record), False
    for msg in out["messages"]:
        content = []
        for item in msg["content"]:
            if item["type"] == "latent" or (item["type"] == "image" and (kept_image or msg["role"] == "assistant")):
                continue
            kept_image |= item["type"] == "image"
            content.append(item)
        msg["content"] = content
    return out


class Attention(nn.Module):
    """Multi-head attention; ``mask`` (batch, 1 or heads, q, k): True where allowed, or added to the logits."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, kv, mask):
        b, n, d = x.shape

        def split(t):
            return t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # (b, heads, len, d_head)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(kv)), split(self.v(kv)), attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


def grid_coords(rows: int, cols: int, merge: int) -> torch.Tensor:
    """(rows * cols * merge^2, 2): the (row, col) centre in [0, 1] of each ViT vector of a picture whose LM tokens
    tile a ``rows`` x ``cols`` grid in raster order, each token a run of ``merge`` x ``merge`` vectors in raster
    order (the order ``Backbone.vision_features`` returns)."""
    token_row, token_col = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)  # (t,)
    sub_row, sub_col = torch.arange(merge).repeat_interleave(merge), torch.arange(merge).repeat(merge)  # (m^2,)
    row = token_row[:, None] * merge + sub_row  # (t, m^2)
    col = token_col[:, None] * merge + sub_col
    return torch.stack([(row.flatten() + 0.5) / (rows * merge), (col.flatten() + 0.5) / (cols * merge)], dim=1)


class VisionHeadBlock(nn.Module):
    """Causal cross-attention over (global context ; local latents), each head preferring keys near the query's place
    in the picture, causal self-attention over the local latents, MLP; pre-norm residuals."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_cross, self.norm_kv, self.norm_self, self.norm_mlp = (nn.LayerNorm(dim) for _ in range(4))
        self.cross = Attention(dim, heads)
        self.self_attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        # per head, exp(locality) x the squared distance between query and key places comes off the logits: from 1
        # (all but blind to place) to 1000 (a 4 x 4 grid's cell and nothing around it), learned from there
        self.locality = nn.Parameter(torch.linspace(0.0, math.log(1000.0), heads))

    def forward(self, x, context, context_mask, distance):
        s, n = x.shape[:2]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # (n, n)
        allowed = torch.cat([context_mask[:, None, :].expand(-1, n, -1), causal.expand(s, n, n)], dim=2)
        bias = -self.locality.exp()[:, None, None] * distance[:, None]  # (s, heads, n, g + n)
        bias = bias.masked_fill(~allowed[:, None], float("-inf")).to(x.dtype)
        kv = self.norm_kv(torch.cat([context, x], dim=1))  # (s, g + n, d)
        x = x + self.cross(self.norm_cross(x), kv, bias)
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, causal.expand(s, 1, n, n))
        return x + self.mlp(self.norm_mlp(x))


class VisionHead(nn.Module):
    """LM hidden states before each slot of a sketch, and the global context with each vector's place in its picture
    -> the sketch's ViT-space latents: ``(s, k, hidden), (s, g, d_v), (s, g), (s, g, 2) -> (s, k * per, d_v)``."""

    def __init__(self, hidden_size: int, feature_size: int, per_token: int, num_tokens: int, layers: int, heads: int):
        super().__init__()
        self.per_token, self.feature_size = per_token, feature_size
        self.in_proj = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                     nn.Linear(hidden_size, per_token * feature_size))
        self.position = nn.Parameter(torch.randn(num_tokens * per_token, feature_size) * 0.02)  # within a sketch
        side = round(num_tokens**0.5)
        if side * side != num_tokens or round(per_token**0.5) ** 2 != per_token:
            raise ValueError(f"sketchpad: a sketch of {num_tokens} tokens of {per_token} ViT vectors is not a square "
                             "grid of square runs")
        self.register_buffer("sketch_coords", grid_coords(side, side, round(per_token**0.5)), persistent=False)
        self.blocks = nn.ModuleList(VisionHeadBlock(feature_size, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(feature_size)
        self.out_proj = nn.Linear(feature_size, feature_size)

    def forward(self, hidden, context, context_mask, context_coords):
        s, k, _ = hidden.shape
        x = self.in_proj(hidden).view(s, k * self.per_token, self.feature_size)  # (s, k * per, d_v)
        x = x + self.position[: x.shape[1]]
        context = context.to(x.dtype)
        places = self.sketch_coords[: x.shape[1]].float()  # (n, 2): where each latent sits in the sketch
        keys = torch.cat([context_coords.float(), places.expand(s, -1, -1)], dim=1)  # (s, g + n, 2)
        distance = ((places[None, :, None] - keys[:, None]) ** 2).sum(-1)  # (s, n, g + n)
        for block in self.blocks:
            x = block(x, context, context_mask, distance)
        return self.out_proj(self.norm(x))


@dataclass
class SketchState:
    """Per-batch inference state: each row's global context, and the current sketch's LM states and latents."""

    project: object  # backbone.project_vision_features
    context: list[list[tuple]]  # per row: input images and finished sketches, (n_i, d_v) ViT features, (n_i, 2) places
    space: object = None  # Sketchpad.head_space on the backbone: the head's output -> a sketch's features
    hidden: list[list[torch.Tensor]] = field(default_factory=list)  # per row: LM states of the current sketch
    features: list[torch.Tensor | None] = field(default_factory=list)  # per row: current sketch (k * per, d_v)


def pad_context(pieces: list[list[torch.Tensor]], width: int, like: torch.Tensor):
    """Per-sketch lists of (n_i, d) tensors -> (s, g, d) zero-padded and its (s, g) validity mask."""
    rows = [torch.cat(p) if p else like.new_zeros(0, width) for p in pieces]
    g = max([r.shape[0] for r in rows], default=0)
    out = like.new_zeros(len(rows), g, width)
    mask = torch.zeros(len(rows), g, dtype=torch.bool, device=like.device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


def stack_context(pieces: list[list[tuple]], width: int, like: torch.Tensor):
    """Per-sketch lists of ((n_i, d) features, (n_i, 2) places) -> the head's context: (s, g, d) zero-padded, its
    (s, g) validity mask and (s, g, 2) places."""
    context, mask = pad_context([[f for f, _ in p] for p in pieces], width, like)
    coords, _ = pad_context([[c.to(like) for _, c in p] for p in pieces], 2, like)
    return context, mask, coords


def image_rows(input_ids: torch.Tensor, image_token_id: int) -> tuple[list[int], list[int]]:
    """(row, first token position) of every inline image, in the order their pixels are concatenated."""
    is_img = input_ids == image_token_id
    first = is_img & ~F.pad(is_img, (1, 0))[:, :-1]
    rows, positions = first.nonzero(as_tuple=True)  # row-major: the collator's order
    return rows.tolist(), positions.tolist()


@register_method
class Sketchpad(LatentMethod):
    name = "sketchpad"
    config_class = SketchpadConfig
    stages = (1, 2)

    def __init__(self, config: SketchpadConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        c = config
        if c.stage not in (1, 2):
            raise ValueError(f"sketchpad has stages 1 and 2, got stage={c.stage}")
        for name in ("num_latent_tokens", "vision_feature_size", "features_per_token"):
            value = getattr(c, name)
            if value is None:
                raise ValueError(f"sketchpad: {name} is not set; LatentVLM.from_pretrained reads it off the backbone, "
                                 "or pass it explicitly")
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"sketchpad: {name} must be a positive integer, got {value!r}")
        grid = c.sketch_grid_thw
        if grid is None:
            raise ValueError("sketchpad: sketch_grid_thw is not set; LatentVLM.from_pretrained reads it off the "
                             "backbone, or pass it explicitly")
        if not (isinstance(grid, (list, tuple)) and len(grid) == 3 and all(isinstance(g, int) and g > 0 for g in grid)):
            raise ValueError(f"sketchpad: sketch_grid_thw must be three positive integers, got {grid!r}")
        for name in ("sketch_size", "head_layers", "head_heads"):
            if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
                raise ValueError(f"sketchpad: {name} must be a positive integer, got {getattr(c, name)!r}")
        if c.vision_feature_size % c.head_heads:
            raise ValueError(f"sketchpad: head_heads={c.head_heads} does not divide vision_feature_size="
                             f"{c.vision_feature_size}")
        if min(c.ce_weight, c.vit_weight, c.embed_weight) < 0:
            raise ValueError("sketchpad: loss weights must be >= 0")
        if not 0 <= c.text_only_share <= 1:
            raise ValueError(f"sketchpad: text_only_share must be in [0, 1], got {c.text_only_share!r}")
        if c.head_target not in HEAD_TARGETS:
            raise ValueError(f"sketchpad: head_target must be one of {', '.join(HEAD_TARGETS)}, got {c.head_target!r}")
        if not isinstance(c.augment_sketches, int) or c.augment_sketches < 0:
            raise ValueError(f"sketchpad: augment_sketches must be an integer >= 0, got {c.augment_sketches!r}")
        if c.augment_sketches and not c.augment_decoder:
            raise ValueError("sketchpad: augment_sketches > 0 re-renders sketches through a sketch decoder; set "
                             "augment_decoder to a folder train/sketch_decoder.py wrote")
        self.augmenter = None  # SketchAugmenter, loaded when training starts (training_data)
        self.head = VisionHead(hidden_size, c.vision_feature_size, c.features_per_token, c.num_latent_tokens,
                               c.head_layers, c.head_heads)
        if c.stage == 1 and not c.head_in_stage1:  # stage 1 fine-tunes the backbone only (release: image loss 0)
            self.head.requires_grad_(False)

    @property
    def sketch_features(self) -> int:
        """ViT vectors in one sketch: K * features_per_token."""
        return self.config.num_latent_tokens * self.config.features_per_token

    @classmethod
    def backbone_config(cls, config, backbone, processor):
        config = dict(config)
        size = config.get("sketch_size", SketchpadConfig.sketch_size)
        if config.get("head_target") == "merger_norm" and backbone.vision_feature_norm is None:
            raise ValueError(f"sketchpad: head_target='merger_norm' needs a per-vector norm in the projector; "
                             f"{backbone.family}'s has none (use head_target='vit')")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"sketchpad: sketch_size must be a positive integer, got {size!r}")
        per = backbone.vision_features_per_token
        from ..data.chat import encode_images

        blank = Image.new("RGB", (size, size))
        pixels, grid = encode_images(processor, [blank], type(backbone).fixed_size_images_kwargs(processor, size))
        with torch.no_grad():  # count the ViT vectors of one sketch, whatever the family's image layout
            n_features = backbone.vision_features(pixels.to(backbone.model.device), grid.to(backbone.model.device))
        tokens = n_features[0].shape[0] // per
        fits = {"vision_feature_size": (backbone.vision_feature_size, "the backbone's ViT width before the merger"),
                "features_per_token": (per, "ViT vectors the backbone's merger fuses into one LM token"),
                "num_latent_tokens": (tokens, f"LM tokens of a {size}x{size} sketch for this backbone; "
                                              "change sketch_size to change it"),
                "sketch_grid_thw": (grid[0].tolist(), f"the image grid of a {size}x{size} sketch")}
        for name, (value, what) in fits.items():
            given = config.get(name)
            if given is None:
                config[name] = value
            elif given != value:
                raise ValueError(f"sketchpad: {name}={given} does not fit the backbone: {what} is {value}")
        return config

    def latent_positions(self, backbone):
        """A sketch's slots take the positions the backbone gives the image tokens of a sketch-sized image, as the
        release feeds its sketches (M-RoPE on Qwen; consecutive on the 1-D families)."""
        return backbone.image_positions(torch.tensor(self.config.sketch_grid_thw), self.config.num_latent_tokens)

    # -- data ---------------------------------------------------------------------------------------
    def latent_mode(self) -> str:
        return "latent"

    def collator_kwargs(self) -> dict:
        return {"latent_target_size": self.config.sketch_size}

    def training_data(self, records, seed: int = 0):
        """Stage 1: ``text_only_share`` of the records, drawn once from ``seed``, as ``text_only`` views (no sketch
        supervision), the release's text-only mixing; stage 2 (and a share of 0) trains on the records as written.
        With ``augment_sketches`` the decoder is loaded and checked here, before the first step, and the
        re-renderings are drawn from ``seed``."""
        c = self.config
        if c.augment_sketches:
            self.augmenter = self.load_augmenter(seed)
        if c.stage != 1 or c.text_only_share == 0:
            return records, None
        chosen = set(random.Random(seed).sample(range(len(records)), round(c.text_only_share * len(records))))
        return [text_only(r) if i in chosen else r for i, r in enumerate(records)], None

    def generators(self):
        return {"sketchpad/augment": self.augmenter.generator} if self.augmenter is not None else {}

    def load_augmenter(self, seed: int) -> SketchAugmenter:
        """The ``augment_decoder`` folder, refused unless it reads this model's sketches, with a generator seeded from
        ``seed``. Read when training starts, not at build time: a checkpoint trained with it loads where it is gone."""
        from ..decoders.sketch import SketchDecoder

        c = self.config
        if not Path(c.augment_decoder).is_dir():
            raise FileNotFoundError(f"sketchpad: augment_decoder {c.augment_decoder!r} is not a folder (a sketch "
                                    "decoder that train/sketch_decoder.py wrote)")
        try:
            decoder = SketchDecoder.from_pretrained(c.augment_decoder)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"sketchpad: augment_decoder {c.augment_decoder!r} is not a sketch decoder: {e}") from e
        reads = (decoder.config.num_features, decoder.config.feature_dim)
        if reads != (self.sketch_features, c.vision_feature_size):
            raise ValueError(f"sketchpad: augment_decoder {c.augment_decoder!r} reads {reads[0]} x {reads[1]} "
                             f"features per picture, a sketch is {self.sketch_features} x {c.vision_feature_size}: "
                             f"train it with train/sketch_decoder.py --encoder-image-size {c.sketch_size} on this ViT")
        return SketchAugmenter(decoder, torch.Generator().manual_seed(seed), c.augment_sketches)

    def rerender(self, model, features: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
        """Each sketch's (K * per, d_v) ViT features after ``ks[i]`` rounds of decoder -> picture -> the collator's
        resize and processor -> ViT, as the release re-renders its input sketches (``--augment``), without gradients.
        Under ZeRO-3 every rank runs the tower ``augment_sketches`` times (the dummy image when no sketch is left)."""
        from ..decoders.sketch import BackboneVisionEncoder

        c, backbone, decoder = self.config, model.backbone, self.augmenter.decoder.to(model.device)
        encode = BackboneVisionEncoder(backbone, model.processor, c.sketch_size)
        out = list(features)
        with torch.no_grad():
            for r in range(c.augment_sketches if model.uniform_compute else max(ks, default=0)):
                todo = [i for i, k in enumerate(ks) if k > r]
                if not todo:  # ZeRO-3: the tower runs as often on every rank (the dummy image here)
                    self.vit_features(model, None, None)
                    continue
                drawn = torch.stack([out[i] for i in todo])  # (m, K * per, d_v)
                if decoder.config.encoder_norm:  # a decoder for a merger_norm head reads normed features
                    norm = backbone.vision_feature_norm
                    drawn = norm(drawn.type(norm.weight.dtype))
                for i, f in zip(todo, encode(decoder.decode(drawn))):  # PIL pictures -> (m, K * per, d_v)
                    out[i] = f.to(features[i].dtype)
        return out

    # -- training -----------------------------------------------------------------------------------
    def text_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The CE labels, the sketch's start / end tokens left out unless ``supervise_sketch_delimiters``."""
        c = self.config
        if c.supervise_sketch_delimiters:
            return labels
        return labels.masked_fill((labels == c.latent_start_id) | (labels == c.latent_end_id), -100)

    def head_space(self, backbone, features: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """ViT features in the head's space: as they are (``head_target="vit"``) or through the merger's norm
        (``frozen``: its parameters detached, so a loss through it leaves the backbone alone)."""
        if self.config.head_target == "vit":
            return features
        norm = backbone.vision_feature_norm
        features = features.type(norm.weight.dtype)
        if not frozen:
            return norm(features)
        if any(getattr(p, "ds_numel", None) is not None for p in norm.parameters()):
            raise ValueError("sketchpad: head_in_stage1 with head_target='merger_norm' reads the merger's norm with "
                             "its parameters detached, which ZeRO-3 partitions away; use ZeRO-2 or head_target='vit'")
        return torch.func.functional_call(norm, {n: p.detach() for n, p in norm.named_parameters()}, (features,))

    def loss_weights(self):
        c = self.config
        if c.stage == 1:
            return {"ce": 1.0, **({"latent_vit": c.vit_weight} if c.head_in_stage1 else {})}
        return {"ce": c.ce_weight, "latent_vit": c.vit_weight, "latent_embed": c.embed_weight}

    @staticmethod
    def vit_features(model, pixel_values, grid) -> tuple[list[torch.Tensor], bool]:
        """(features, real): the frozen ViT's features of these images. With no images, while training on several
        ranks, the dummy image's (``real=False``): every rank then runs the tower and the merger the same number of
        times in the same order, as ZeRO-3 needs (see ``LatentVLM.uniform_compute``)."""
        real = pixel_values is not None
        if not real:
            if not model.uniform_compute:
                return [], False
            pixel_values, grid = model.backbone.dummy_image_inputs()
        with torch.no_grad():
            return model.backbone.vision_features(pixel_values, grid), real

    def sketch_targets(self, model, batch) -> tuple[list[torch.Tensor], bool]:
        """The helper images' ViT features, one (K * per, d_v) per latent segment, checked against the sketch grid."""
        targets, real = self.vit_features(model, batch.get("latent_target_pixel_values"),
                                          batch.get("latent_target_grid_thw"))
        for t in targets if real else []:
            if t.shape[0] != self.sketch_features:
                raise ValueError(
                    f"batch {batch.get('ids')}: a helper image gives {t.shape[0]} ViT features, a sketch is "
                    f"{self.sketch_features} (K={self.config.num_latent_tokens} tokens of "
                    f"{self.config.sketch_size} px); "
                    "collate with model.collator(), which resizes helper images to sketch_size")
        return targets, real

    def training_losses(self, model, batch):
        c, backbone = self.config, model.backbone
        b, t = model.latent_slots(batch)
        targets, real = self.sketch_targets(model, batch)
        if b.numel() and not real:
            raise ValueError(f"batch {batch.get('ids')}: {b.numel()} latent pad tokens but no helper images "
                             "(latent_target_pixel_values); collate with model.collator()")
        embeds = model.embed_inputs(batch)
        if targets:
            target_embeds = backbone.project_vision_features(torch.cat(targets))  # (n_slots, hidden)
            fed = target_embeds  # what the slots hold: the true sketch, or (augment_sketches) its re-rendering
            if c.augment_sketches and model.training:
                if self.augmenter is None:  # trained without training_data: seed 0
                    self.augmenter = self.load_augmenter(0)
                ks = self.augmenter.rounds(len(targets)) if real else [0] * len(targets)
                fed = backbone.project_vision_features(torch.cat(self.rerender(model, targets, ks)))
            if real:  # teacher forcing: every slot holds the sketch, as the merger would feed a real image
                model.check_latent_targets((b, t), target_embeds, batch)
                embeds = embeds.index_put((b, t), fed.to(embeds.dtype))
            else:
                embeds = embeds + 0.0 * fed.sum().to(embeds.dtype)
        hidden = model.run_language_model(embeds, batch).last_hidden_state  # (batch, seq, hidden)
        losses = {"ce": model.lm_loss(hidden, self.text_labels(batch["labels"]))}
        if c.stage == 1 and not c.head_in_stage1:
            return losses
        beside = c.stage == 1  # the head learns beside stage 1: nothing of its loss may reach the backbone
        images, images_real = self.vit_features(model, batch.get("pixel_values"), batch.get("image_grid_thw"))
        if not real:  # no sketch in this batch: run the head (and in stage 2 the merger) anyway, at weight 0
            predicted = self.head(hidden.new_zeros(1, c.num_latent_tokens, hidden.shape[-1]),
                                  *stack_context([[]], c.vision_feature_size, hidden))
            if beside:
                return {**losses, "latent_vit": predicted.sum() * 0.0}
            zero = (predicted.sum() + backbone.project_vision_features(predicted.flatten(0, 1)).sum()) * 0.0
            return {**losses, "latent_vit": zero, "latent_embed": zero}
        states = hidden.detach() if beside and not c.head_trains_states else hidden
        predicted, space = self.head_sketches(model, batch, states, targets, images if images_real else [], beside)
        losses["latent_vit"] = self.sketch_l1(self.head_space(backbone, predicted, frozen=beside),
                                              torch.stack(space), b.view(-1, c.num_latent_tokens)[:, 0])
        if not beside:
            embedded = backbone.project_vision_features(predicted.flatten(0, 1))  # (s * k, hidden)
            losses["latent_embed"] = F.l1_loss(embedded.float(), target_embeds.float())
        return losses

    def sketch_l1(self, drawn: torch.Tensor, true: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """L1 between ``(s, n, d)`` sketches in segment order (``rows``: each one's batch row), each vector weighted by
        ``changed_weight`` (config) where it changes from its row's previous sketch."""
        error = (drawn.float() - true.float()).abs().mean(-1)  # (s, n)
        if not self.config.changed_weight:
            return error.mean()
        true = true.float()
        later = torch.zeros_like(rows, dtype=torch.bool)  # (s,): a sketch with an earlier one in its row
        later[1:] = rows[1:] == rows[:-1]
        change = torch.zeros_like(error)
        change[1:] = (true[1:] - true[:-1]).abs().mean(-1) * later[1:, None]
        mean = change[later].mean() if later.any() else change.new_ones(())
        weight = 1 + self.config.changed_weight * change / mean.clamp_min(1e-8)
        return (error * weight).sum() / weight.sum()

    def head_sketches(self, model, batch, states, targets, images, frozen: bool = False):
        """The head's sketch for every latent segment of a teacher-forced batch: ``states`` the LM's last hidden
        states, ``targets`` / ``images`` the helper images' / inline images' ViT features -> (the sketches
        ``(s, K * per, d_v)``, the targets in the head's space); ``frozen`` as in ``head_space``."""
        backbone, k = model.backbone, self.config.num_latent_tokens
        b, t = model.latent_slots(batch)
        space = [self.head_space(backbone, f, frozen=frozen) for f in targets]
        images = [(self.head_space(backbone, f, frozen=frozen), self.image_coords(backbone, g, f))
                  for f, g in zip(images, batch["image_grid_thw"])] if images else []
        context = self.global_context(batch, b, t, space, images, backbone.image_token_id)
        return self.head(states[b, t - 1].view(-1, k, states.shape[-1]), *context), space

    @torch.no_grad()
    def teacher_forced_sketches(self, model, batch):
        """What the head draws for every latent segment of ``batch`` given the true earlier sketches (in the slots and
        in its context) -> (the head's sketches, the true ones), both ``(s, K * per, d_v)`` in the head's space:
        how well it draws, apart from whether the model's own reasoning before a sketch is right."""
        backbone = model.backbone
        targets, real = self.sketch_targets(model, batch)
        if not real:
            raise ValueError(f"batch {batch.get('ids')}: no helper images to teacher-force (records without sketches)")
        slots = model.latent_slots(batch)
        embeds = model.embed_inputs(batch).index_put(
            slots, backbone.project_vision_features(torch.cat(targets)).to(model.dtype))
        hidden = model.run_language_model(embeds, batch).last_hidden_state  # (batch, seq, hidden)
        images, _ = self.vit_features(model, batch.get("pixel_values"), batch.get("image_grid_thw"))
        drawn, space = self.head_sketches(model, batch, hidden, targets, images)
        return self.head_space(backbone, drawn), torch.stack(space)

    def global_context(self, batch, b, t, targets, images, image_token_id):
        """Each sketch's global context: its row's earlier inline images (``images``: (features, places) pairs in
        the batch's order) and earlier sketches (``targets``), as ``stack_context`` gives it to the head."""
        k = self.config.num_latent_tokens
        seg_rows, seg_starts = b.view(-1, k)[:, 0].tolist(), t.view(-1, k)[:, 0].tolist()
        placed = list(zip(*image_rows(batch["input_ids"], image_token_id), images)) if images else []
        pieces = []
        for s, (row, start) in enumerate(zip(seg_rows, seg_starts)):
            earlier = [f for r, p, f in placed if r == row and p < start]
            # segments come in row-major order
            earlier += [(targets[j], self.head.sketch_coords) for j in range(s) if seg_rows[j] == row]
            pieces.append(earlier)
        return stack_context(pieces, self.config.vision_feature_size, targets[0])

    def image_coords(self, backbone, grid_thw, features) -> torch.Tensor:
        """(n, 2): where each of an input image's n ViT vectors sits in it (``grid_coords`` over the LM tokens'
        grid, ``backbone.token_grid``)."""
        per = self.config.features_per_token
        rows, cols = backbone.token_grid(grid_thw, features.shape[0] // per)
        coords = grid_coords(rows, cols, round(per**0.5))
        if coords.shape[0] != features.shape[0]:
            raise ValueError(f"sketchpad: an input image gives {features.shape[0]} ViT vectors, its {rows} x {cols} "
                             f"token grid of {per} vectors each {coords.shape[0]}")
        return coords.to(features.device)

    def image_context(self, backbone, input_ids, pixel_values, grid) -> list[list[tuple]]:
        """Per row of ``input_ids``: its inline images as (ViT features in the head's space, places) pairs, in order."""
        context = [[] for _ in range(input_ids.shape[0])]
        if pixel_values is None:
            return context
        with torch.no_grad():
            feats = backbone.vision_features(pixel_values, grid)
        for row, f, g in zip(image_rows(input_ids, backbone.image_token_id)[0], feats, grid):
            context[row].append((self.head_space(backbone, f), self.image_coords(backbone, g, f)))
        return context

    # -- inference ----------------------------------------------------------------------------------
    def generation_state(self, model, batch):
        backbone, n = model.backbone, batch["input_ids"].shape[0]
        context = self.image_context(backbone, batch["input_ids"], batch.get("pixel_values"),
                                     batch.get("image_grid_thw"))
        return SketchState(project=backbone.project_vision_features, context=context,
                           space=lambda f: self.head_space(backbone, f).to(f.dtype),
                           hidden=[[] for _ in range(n)], features=[None] * n)

    def next_latent(self, hidden, context: LatentContext | None = None):
        if context is None or not isinstance(context.state, SketchState):
            raise ValueError("sketchpad.next_latent needs the generation context (it runs inside vlatent.generate)")
        state, k, per = context.state, self.config.num_latent_tokens, self.config.features_per_token
        rows, steps = context.rows.tolist(), context.step.tolist()
        if not rows:  # synced generation (ZeRO-3): this process has no sketching row but runs the modules anyway
            out = self.head(hidden.new_zeros(1, 1, hidden.shape[-1]),
                            *stack_context([[]], self.config.vision_feature_size, hidden))
            return state.project(out[0])[:0].to(hidden.dtype)  # (0, hidden)
        for row, step, h in zip(rows, steps, hidden):
            if step >= k:
                raise ValueError(f"sketchpad sketches are exactly K={k} latents; generate with latent_steps='fixed'")
            if step == 0:  # a new sketch: the finished one joins the row's global context
                if state.features[row] is not None:
                    state.context[row].append((state.features[row], self.head.sketch_coords))
                state.hidden[row], state.features[row] = [], None
            state.hidden[row].append(h)
        lengths = [len(state.hidden[r]) for r in rows]
        local = hidden.new_zeros(len(rows), max(lengths), hidden.shape[-1])  # padded at the end: causal, never read
        for i, r in enumerate(rows):
            local[i, : lengths[i]] = torch.stack(state.hidden[r])
        context_rows = stack_context([state.context[r] for r in rows], self.config.vision_feature_size, hidden)
        out = self.head(local, *context_rows)  # (m, max_len * per, d_v)
        new = []
        for i, r in enumerate(rows):
            state.features[r] = state.space(out[i, : lengths[i] * per])  # what the decoder and later sketches see
            new.append(out[i, (lengths[i] - 1) * per : lengths[i] * per])
        return state.project(torch.cat(new)).to(hidden.dtype)  # (m, hidden)

    def policy_means(self, model, hidden, rollouts):
        """The vision head over each sketch's K states at once (its attention is causal, so slot j sees what it saw
        in generation), with the global context generation had: the row's input images' ViT features and its earlier
        sketches' features as generated (``rollouts.segment_features``, history like the latents fed)."""
        c, backbone = self.config, model.backbone
        k, width = c.num_latent_tokens, c.vision_feature_size
        if hidden.shape[0] == 0:  # run the head and merger anyway (ZeRO-3: every process runs the same modules)
            out = self.head(hidden.new_zeros(1, 1, hidden.shape[-1]), *stack_context([[]], width, hidden))
            return backbone.project_vision_features(out[0])[:0].to(hidden.dtype)
        if hidden.shape[0] % k or len(rollouts.segment_features) != hidden.shape[0] // k:
            raise ValueError(f"sketchpad: {hidden.shape[0]} latent steps in {len(rollouts.segment_features)} "
                             f"sketches; a sketch is exactly K={k} latents (generate with latent_steps='fixed')")
        context = self.image_context(backbone, rollouts.prompt_ids, rollouts.pixel_values, rollouts.image_grid_thw)
        pieces = []
        for features, row in zip(rollouts.segment_features, rollouts.latent_mask.nonzero()[::k, 0].tolist()):
            pieces.append(list(context[row]))
            context[row].append((features.to(hidden), self.head.sketch_coords))
        out = self.head(hidden.view(-1, k, hidden.shape[-1]), *stack_context(pieces, width, hidden))
        return backbone.project_vision_features(out.flatten(0, 1)).to(hidden.dtype)  # (sketches * k, hidden)

    def segment_features(self, state, row):
        return state.features[row] if isinstance(state, SketchState) else None
