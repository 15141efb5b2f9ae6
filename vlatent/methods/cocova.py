"""CoCoVa: Chain of Continuous Vision-Language Thought (arXiv 2511.02360), its Latent Q-Former (LQ-Former).

A latent segment ``<|latent_start|> <|latent_pad|>*K <|latent_end|>`` holds K latent thoughts. Thought k is made by
the LQ-Former from the LM's last hidden state (the current thought context), the input image's visual tokens and
the thoughts already made in the segment:

    queries = Q + W_h h_{k-1}                                          (num_queries learned latent queries)
    repeat num_iterations times:                                       (iterative refinement)
        relevance_i = <W_q mean(queries), W_v v_i> / sqrt(d)           (token selection by relevance to the thought)
        V_sel = top-num_selected visual tokens by relevance
        for each layer: queries += tanh(g_v) CrossAttn(queries, V_sel; bias log softmax(relevance))
                        queries += tanh(g_z) CrossAttn(queries, previous thoughts)
                        queries += SelfAttn(queries);  queries += MLP(queries)
    thought_k = LayerNorm(mean(queries))      (d-dim: the method-space thought, ``LatentSegment.features``)
    z_k = W_o thought_k                       (LM input at the k-th pad)

Training is recurrent and exact, as Mirage stage 2 runs it: pass j fills every row's j-th latent slot from the
hidden state before it (S slots in a row cost S + 1 forwards; backprop through the whole chain). The objective is

    loss = ce_weight * CE(text)
         + contrastive_weight * (CLIP(thought, helper image) + CLIP(thought, following text)) / 2
         + diffusion_weight * || eps - UNet(x_t, t | thoughts) ||^2

CLIP is symmetric InfoNCE at a learned temperature (as ``open_clip``'s ``ClipLoss``) between a segment's mean thought
and the mean vision-tower embedding of its helper image / the mean token embedding of the text that follows the segment
(up to the next segment or the turn's end), each centred, through a linear projection and normalised. Its negatives are
the other segments of the micro-batch, of every process when training on several (``contrastive_gather``: gathered,
this process's rows keeping their gradient) and of the last ``contrastive_queue`` segments seen in training (their
views detached, the newest per record and segment; vlatent's choice, the paper names no queue): with one segment per
process the loss is no longer 0. A queued view of the anchor's own record and segment is never its negative. The
reconstruction is a small ``diffusers`` ``UNet2DConditionModel`` with a ``DDPMScheduler`` denoising the helper image
(``recon_size`` px, pixel space) with the segment's K thoughts as cross-attention context, its attention heads 8
channels wide at every level; ``reconstruct`` samples it.

Choices the paper leaves open: the visual tokens are the input images' merged vision tokens in LM space (null token
added so a row without image still has a key); the selection's gradient reaches the scorer through the attention
bias; text targets are frozen (detached) input embeddings; the diffusion target is the record's helper image (what
the thought should look like) rather than the input image; gates start at tanh(0.5). Inspection:
``similarity_maps`` colours each image patch by the cosine similarity of its visual token with the segment's latents.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torch import nn
from transformers.utils import ModelOutput

from ..data.chat import encode_images
from .base import LatentContext, LatentMethod, MethodConfig, register_method
from .sketchpad import pad_context


@dataclass
class CocovaConfig(MethodConfig):
    num_latent_tokens: int = 8  # K latent thoughts per segment
    lq_hidden_size: int = 512  # d: LQ-Former width
    lq_heads: int = 8
    lq_layers: int = 2  # layers run in every refinement iteration (shared across iterations)
    num_queries: int = 8  # learned latent queries pooled into one thought
    num_iterations: int = 3  # refinement iterations per thought, each re-selecting visual tokens
    num_selected: int = 64  # salient visual tokens kept per iteration
    contrastive_dim: int = 256
    contrastive_queue: int = 256  # past segments' detached views kept as extra InfoNCE negatives (0: none)
    contrastive_gather: bool = True  # training on several processes: all processes' segments are negatives
    recon_size: int = 32  # side of the helper image the diffusion decoder reconstructs
    unet_channels: list[int] = field(default_factory=lambda: [64, 128])
    unet_norm_groups: int = 32
    diffusion_steps: int = 1000
    ce_weight: float = 1.0
    # the paper gives no weights; the contrastive gradient reaches the whole LM through the thoughts and can be much
    # larger than CE's, so under max_grad_norm clipping it shrinks CE's update: the tiny learning arm needs 0.05 / 0.1
    contrastive_weight: float = 0.5
    diffusion_weight: float = 0.5


@dataclass
class LQFormerOutput(ModelOutput):
    latents: torch.Tensor | None = None  # (m, hidden): fed to the LM
    thoughts: torch.Tensor | None = None  # (m, d): the thoughts in LQ-Former space
    relevance: torch.Tensor | None = None  # (m, 1 + n_visual): last iteration's relevance (null token first)


class LQFormerLayer(nn.Module):
    """Pre-norm: gated cross-attention to the selected visual tokens and to the previous thoughts, then
    self-attention among the queries and an MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm_visual, self.norm_thoughts, self.norm_self, self.norm_mlp = (nn.LayerNorm(d) for _ in range(4))
        self.visual_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.thought_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.visual_gate = nn.Parameter(torch.full((1,), 0.5))  # 1-d: DeepSpeed broadcasts no 0-d tensors
        self.thought_gate = nn.Parameter(torch.full((1,), 0.5))
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, queries, visual, visual_bias, thoughts, thought_mask):
        # queries (m, q, d); visual (m, s, d) with bias (m, s); thoughts (m, p, d) with mask (m, p), True = keep
        bias = visual_bias[:, None, :].expand(-1, queries.shape[1], -1).repeat_interleave(self.heads, 0)
        h = self.norm_visual(queries)
        queries = queries + torch.tanh(self.visual_gate) * self.visual_attn(h, visual, visual, attn_mask=bias)[0]
        h = self.norm_thoughts(queries)
        attended = self.thought_attn(h, thoughts, thoughts, key_padding_mask=~thought_mask)[0]
        queries = queries + torch.tanh(self.thought_gate) * attended
        h = self.norm_self(queries)
        queries = queries + self.self_attn(h, h, h)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class LQFormer(nn.Module):
    """Latent Q-Former: (current hidden state, visual tokens, previous thoughts) -> the next latent thought."""

    def __init__(self, config: CocovaConfig, hidden_size: int):
        super().__init__()
        c, d = config, config.lq_hidden_size
        self.config = c
        self.queries = nn.Parameter(torch.randn(c.num_queries, d) * 0.02)
        self.from_hidden = nn.Linear(hidden_size, d)
        self.from_visual = nn.Linear(hidden_size, d)
        self.from_thought = nn.Linear(hidden_size, d)
        self.score_query, self.score_visual = nn.Linear(d, d), nn.Linear(d, d)
        self.null_visual = nn.Parameter(torch.zeros(1, 1, d))  # always selectable: rows without image have a key
        self.first_thought = nn.Parameter(torch.zeros(1, 1, d))  # "no previous thought yet"
        self.layers = nn.ModuleList(LQFormerLayer(d, c.lq_heads) for _ in range(c.lq_layers))
        self.norm = nn.LayerNorm(d)
        self.to_latent = nn.Linear(d, hidden_size)

    def forward(self, hidden, visual, visual_mask, previous, previous_mask) -> LQFormerOutput:
        """hidden (m, H); visual (m, n, H) + mask (m, n); previous latents (m, p, H) + mask (m, p)."""
        m, d = hidden.shape[0], self.config.lq_hidden_size
        queries = self.queries[None] + self.from_hidden(hidden)[:, None]  # (m, q, d)
        visual = torch.cat([self.null_visual.expand(m, -1, -1), self.from_visual(visual)], 1)  # (m, 1 + n, d)
        visual_mask = F.pad(visual_mask, (1, 0), value=True)
        thoughts = torch.cat([self.first_thought.expand(m, -1, -1), self.from_thought(previous)], 1)  # (m, 1 + p, d)
        thought_mask = F.pad(previous_mask, (1, 0), value=True)
        k = min(self.config.num_selected, visual.shape[1])
        for _ in range(self.config.num_iterations):
            relevance = (self.score_query(queries.mean(1))[:, None] * self.score_visual(visual)).sum(-1) / math.sqrt(d)
            relevance = relevance.masked_fill(~visual_mask, float("-inf"))  # (m, 1 + n)
            top = relevance.topk(k, dim=1).indices  # (m, k): the salient tokens for the current thought
            selected = visual.gather(1, top[..., None].expand(-1, -1, d))
            bias = relevance.log_softmax(-1).gather(1, top)  # -inf on padding picked when a row has < k tokens
            for layer in self.layers:
                queries = layer(queries, selected, bias, thoughts, thought_mask)
        thought = self.norm(queries.mean(1))  # (m, d)
        return LQFormerOutput(latents=self.to_latent(thought), thoughts=thought, relevance=relevance)


def visual_tokens(embeds, input_ids, image_token_id) -> tuple[torch.Tensor, torch.Tensor]:
    """The inline images' tokens of every row (their embeddings, already in LM space): (n, V, H) and (n, V) mask."""
    is_image = input_ids == image_token_id
    return pad_context([[embeds[b][is_image[b]]] for b in range(input_ids.shape[0])], embeds.shape[-1], embeds)


@dataclass
class CocovaState:
    visual: torch.Tensor  # (n, V, H) prompt images' tokens
    visual_mask: torch.Tensor  # (n, V)
    latents: list[list[torch.Tensor]]  # per row: the current segment's latents so far, each (1, H)
    thoughts: list[list[torch.Tensor]]  # per row: the same thoughts in LQ-Former space


@register_method
class Cocova(LatentMethod):
    name = "cocova"
    vlpo_refusal = ("its LQ-Former's latent depends on the generation state (the selected salient visual tokens and "
                    "the segment's earlier thoughts), which VLPO's teacher-forced objective does not rebuild")
    config_class = CocovaConfig

    def __init__(self, config: CocovaConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        c = config
        for field_name in ("num_latent_tokens", "lq_hidden_size", "lq_heads", "lq_layers", "num_queries",
                           "num_iterations", "num_selected", "contrastive_dim", "recon_size", "unet_norm_groups",
                           "diffusion_steps"):
            value = getattr(c, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"cocova: {field_name} must be a positive integer, got {value!r}")
        if c.lq_hidden_size % c.lq_heads:
            raise ValueError(f"cocova: lq_hidden_size={c.lq_hidden_size} is not divisible by lq_heads={c.lq_heads}")
        if not c.unet_channels or any(ch % c.unet_norm_groups or ch % 8 for ch in c.unet_channels):
            raise ValueError(f"cocova: every unet_channels entry {c.unet_channels} must be a multiple of "
                             f"unet_norm_groups={c.unet_norm_groups} and of 8 (the attention head size)")
        factor = 2 ** (len(c.unet_channels) - 1)
        if c.recon_size % factor:
            raise ValueError(f"cocova: recon_size={c.recon_size} must be a multiple of {factor} "
                             f"({len(c.unet_channels) - 1} UNet downsamplings)")
        self.lq_former = LQFormer(c, hidden_size)
        self.thought_proj = nn.Linear(c.lq_hidden_size, c.contrastive_dim, bias=False)  # as CLIP's: no bias
        self.visual_proj = nn.Linear(hidden_size, c.contrastive_dim, bias=False)
        self.text_proj = nn.Linear(hidden_size, c.contrastive_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # CLIP init
        n = len(c.unet_channels)
        self.unet = UNet2DConditionModel(
            sample_size=c.recon_size, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=tuple(c.unet_channels), norm_num_groups=c.unet_norm_groups,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            # diffusers reads ``attention_head_dim`` as the number of heads (its old naming, kept for compatibility):
            # channels // 8 heads per block makes every head 8 wide, as the check above says
            cross_attention_dim=c.lq_hidden_size, attention_head_dim=tuple(ch // 8 for ch in c.unet_channels))
        self.scheduler = DDPMScheduler(num_train_timesteps=c.diffusion_steps)
        if not isinstance(c.contrastive_queue, int) or c.contrastive_queue < 0:
            raise ValueError(f"cocova: contrastive_queue must be an integer >= 0, got {c.contrastive_queue!r}")
        # (n, d + 2H + 1) float64: [thought | visual | text | key] of past segments, newest first; not saved
        self.queue: torch.Tensor | None = None

    # -- data / training --------------------------------------------------------------------------------
    def collator_kwargs(self) -> dict:
        return {"latent_target_pixels": self.config.recon_size}

    def loss_weights(self):
        c = self.config
        return {"ce": c.ce_weight, "contrastive": c.contrastive_weight, "diffusion": c.diffusion_weight}

    def training_losses(self, model, batch):
        c = self.config
        embeds = model.embed_inputs(batch)
        visual, visual_mask = visual_tokens(embeds, batch["input_ids"], model.backbone.image_token_id)
        starts = _segment_starts(batch["input_ids"], c.latent_start_id)
        latents, thoughts = {}, {}  # (row, position) -> this slot's latent (H,) / thought (d,)

        def next_latent(hidden, rows, slots):
            # earlier latents of the same segment, oldest first: the LQ-Former's "previous thoughts"
            previous = [[latents[(r, p)][None] for p in range(int(starts[r, s]) + 1, s)]
                        for r, s in zip(rows.tolist(), slots.tolist())]
            previous, previous_mask = pad_context(previous, hidden.shape[-1], hidden)
            out = self.lq_former(hidden, visual[rows], visual_mask[rows], previous, previous_mask)
            for n, key in enumerate(zip(rows.tolist(), slots.tolist())):
                latents[key], thoughts[key] = out.latents[n], out.thoughts[n]
            return out.latents

        _, out, (b, t) = model.fill_latents(embeds, batch, model.position_ids(batch),
                                            model.decoder_mask(batch, embeds.dtype), next_latent=next_latent)
        hidden = out.last_hidden_state
        losses = {"ce": model.lm_loss(hidden, batch["labels"])}
        gather = c.contrastive_gather and model.uniform_compute
        if not b.numel():  # no segment in the batch: keep the modules in the graph at weight 0
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            if gather:  # the other processes' gather needs this one (and their rows join the queue here too)
                empty = hidden.new_zeros(0, self.hidden_size)
                self.contrastive_loss(empty.new_zeros(0, c.lq_hidden_size), empty, empty, gather=True)
            return {**losses, "contrastive": zero, "diffusion": zero}
        k = c.num_latent_tokens
        segments = torch.stack([thoughts[key] for key in zip(b.tolist(), t.tolist())])
        segments = segments.view(-1, k, c.lq_hidden_size)  # (S, K, d): slots come segment by segment
        losses["contrastive"] = self._contrastive(model, batch, segments, b.view(-1, k)[:, 0], t.view(-1, k)[:, -1],
                                                  gather=gather)
        losses["diffusion"] = self._diffusion(batch, segments)
        return losses

    def _contrastive(self, model, batch, segments, rows, last_pad, gather=False):
        """CLIP(thought, helper image) and CLIP(thought, text after the segment), averaged (``contrastive_loss``)."""
        helpers = model.latent_targets(batch)  # frozen vision tower + projector: one (n_i, H) per segment
        if len(helpers) != segments.shape[0]:
            raise ValueError(f"batch {batch.get('ids')}: {segments.shape[0]} latent segments but {len(helpers)} helper "
                             "images; collate with model.collator() (latent mode, targets on)")
        visual = torch.stack([h.mean(0) for h in helpers])  # (S, H)
        turn_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
        text = []
        for row, pad in zip(rows.tolist(), last_pad.tolist()):
            ids = batch["input_ids"][row].tolist()
            stop = pad + 2  # from the end token: text up to the next segment or through the end of the turn
            while stop < len(ids) and ids[stop] != self.config.latent_start_id and ids[stop - 1] != turn_end:
                stop += 1
            text.append(model.backbone.embed_tokens(batch["input_ids"][row, pad + 1:stop]).detach().mean(0))
        return self.contrastive_loss(segments.mean(1), visual, torch.stack(text), segment_keys(batch, rows), gather)

    def contrastive_loss(self, thought, visual, text, keys=None, gather=False):
        """Symmetric InfoNCE of this process's S segments against the pool: the segments of this step (of every process
        with ``gather``: others' rows detached) then the queue. thought (S, d), visual / text (S, H): mean-pooled views;
        ``keys`` (S,): a record-and-segment key per segment (``segment_keys``; None: unknown), so that a queued view of
        the same segment is no negative. Each view is centred over the pool (mean-pooled embeddings share one dominant
        direction that swamps the rest), projected and normalised. In training the step's rows then join the queue."""
        s, d, h = thought.shape[0], thought.shape[1], visual.shape[1]
        keys = torch.full((s,), float("nan"), dtype=torch.float64, device=thought.device) if keys is None else keys
        local = torch.cat([thought.double(), visual.double(), text.double(), keys.to(thought.device)[:, None]], 1)
        step, offset = gather_rows(local) if gather else (local, 0)
        pool = step if self.queue is None else torch.cat([step, self.queue.to(step)])
        if self.training and self.config.contrastive_queue:
            fresh = step.detach()
            old = pool[step.shape[0]:].detach()
            old = old[~torch.isin(old[:, -1], fresh[:, -1])]  # the newest view per segment (NaN keys never match)
            self.queue = torch.cat([fresh, old])[: self.config.contrastive_queue]
        if s == 0:
            return None
        views = pool.split([d, h, h, 1], 1)
        weight = self.thought_proj.weight
        thought, visual, text = (F.normalize(proj((x - x.mean(0)).to(weight.dtype)).float(), dim=-1)
                                 for x, proj in zip(views[:3], (self.thought_proj, self.visual_proj, self.text_proj)))
        positives = torch.arange(offset, offset + s, device=pool.device)
        same = views[3][:, 0][None] == keys.to(pool.device)[:, None]  # (S, P): the anchor's own segment
        same[torch.arange(s, device=pool.device), positives] = False
        scale = self.logit_scale.clamp(max=math.log(100)).exp().float()

        def info_nce(anchor, other):  # anchors: this process's rows of one view; candidates: all rows of the other
            logits = (scale * anchor[positives] @ other.T).masked_fill(same, float("-inf"))
            return F.cross_entropy(logits, positives)

        return sum((info_nce(thought, v) + info_nce(v, thought)) / 2 for v in (visual, text)) / 2

    def _diffusion(self, batch, segments):
        """DDPM noise-prediction loss of the UNet reconstructing each segment's helper image from its thoughts."""
        images = batch.get("latent_target_images")
        if images is None or images.shape[0] != segments.shape[0]:
            raise ValueError(f"batch {batch.get('ids')}: cocova needs the helper images' pixels "
                             "(latent_target_images, one per segment); collate with model.collator()")
        images = images.to(segments.dtype)
        noise = torch.randn_like(images)
        steps = torch.randint(0, self.config.diffusion_steps, (images.shape[0],), device=images.device)
        noisy = self.scheduler.add_noise(images, noise, steps)
        predicted = self.unet(noisy, steps, encoder_hidden_states=segments).sample
        return F.mse_loss(predicted.float(), noise.float())

    # -- inference --------------------------------------------------------------------------------------
    def generation_state(self, model, batch) -> CocovaState:
        embeds = model.backbone.embed_inputs(batch["input_ids"], batch.get("pixel_values"), batch.get("image_grid_thw"))
        visual, mask = visual_tokens(embeds, batch["input_ids"], model.backbone.image_token_id)
        n = batch["input_ids"].shape[0]
        return CocovaState(visual, mask, [[] for _ in range(n)], [[] for _ in range(n)])

    def next_latent(self, hidden, context: LatentContext | None = None):
        if context is None or not isinstance(context.state, CocovaState):
            raise ValueError("cocova.next_latent needs the generation context (it runs inside vlatent.generate)")
        state, rows = context.state, context.rows.tolist()
        for row, step in zip(rows, context.step.tolist()):
            if step == 0:  # a new segment: its chain of thoughts starts empty
                state.latents[row], state.thoughts[row] = [], []
        previous, previous_mask = pad_context([state.latents[r] for r in rows], hidden.shape[-1], hidden)
        out = self.lq_former(hidden, state.visual[rows], state.visual_mask[rows], previous, previous_mask)
        for n, row in enumerate(rows):
            state.latents[row].append(out.latents[n:n + 1])  # (1, H): pad_context concatenates them
            state.thoughts[row].append(out.thoughts[n])
        return out.latents

    def segment_features(self, state, row):
        return torch.stack(state.thoughts[row]) if isinstance(state, CocovaState) and state.thoughts[row] else None

    # -- inspection -------------------------------------------------------------------------------------
    @torch.no_grad()
    def similarity_maps(self, model, image: Image.Image, segments) -> list[Image.Image]:
        """One heat map per latent segment over the image: each merged patch coloured by the cosine similarity of
        its visual token (LM space) with the segment's latents (max over the K thoughts); red = similar."""
        from ..generation import _as_image

        image = _as_image(image, "image")
        pixel_values, grid = encode_images(model.processor, [image])
        tokens = model.backbone.encode_images(pixel_values.to(model.device, model.dtype), grid.to(model.device))[0]
        tokens = tokens.float()  # (h * w, H) in raster order
        h = round(math.sqrt(tokens.shape[0] * image.height / image.width))  # the token grid keeps the aspect ratio
        w = tokens.shape[0] // h
        if h * w != tokens.shape[0]:
            raise ValueError(f"cannot lay {tokens.shape[0]} visual tokens out as a grid for a "
                             f"{image.width}x{image.height} image")
        maps = []
        for segment in segments:
            latents = segment.latents.to(tokens.device).float()  # (K, H)
            sim = F.cosine_similarity(tokens[:, None], latents[None], dim=-1).amax(1).view(h, w)  # (h, w)
            sim = (sim - sim.min()) / (sim.max() - sim.min()).clamp_min(1e-6)
            heat = np.stack([sim.cpu().numpy(), np.zeros((h, w)), 1 - sim.cpu().numpy()], -1)
            overlay = Image.fromarray((heat * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
            maps.append(Image.blend(image, overlay, 0.5))
        return maps

    @torch.no_grad()
    def reconstruct(self, thoughts: torch.Tensor, steps: int = 50, generator=None) -> list[Image.Image]:
        """Sample the diffusion decoder: (S, K, d) thoughts (``LatentSegment.features``) -> S images."""
        thoughts = thoughts.to(self.logit_scale.device, self.logit_scale.dtype)
        size = self.config.recon_size
        scheduler = DDPMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        x = torch.randn(thoughts.shape[0], 3, size, size, generator=generator).to(thoughts)
        for step in scheduler.timesteps:
            x = scheduler.step(self.unet(x, step, encoder_hidden_states=thoughts).sample, step, x,
                               generator=generator).prev_sample
        pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]


def _segment_starts(input_ids: torch.Tensor, start_id: int) -> torch.Tensor:
    """(batch, seq): position of the latest latent start token at or before each position (-1 before any)."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(input_ids == start_id, pos, -1).cummax(1).values


def segment_keys(batch, rows: torch.Tensor) -> torch.Tensor | None:
    """(S,) float64: one key per segment (its record id and ordinal in the row, hashed to 48 bits, exact in float64),
    in segment order; None when the batch has no ids."""
    ids = batch.get("ids")
    if ids is None:
        return None
    keys, seen = [], {}
    for row in rows.tolist():
        j = seen[row] = seen.get(row, -1) + 1
        digest = hashlib.blake2b(f"{ids[row]}\0{j}".encode(), digest_size=6).digest()
        keys.append(float(int.from_bytes(digest, "big")))
    return torch.tensor(keys, dtype=torch.float64, device=rows.device)


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows of ``x`` (n_i, D; n_i may differ, also 0), concatenated in rank order, and where this
    process's rows start. This process's rows keep their gradient; the others' arrive detached."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(v) for v in sizes]
    if max(sizes) == 0:
        return x, 0
    padded = x.new_zeros(max(sizes), x.shape[1])
    padded[: x.shape[0]] = x.detach()
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    parts = [chunk[:size] for chunk, size in zip(chunks, sizes)]
    parts[rank] = x
    return torch.cat(parts), sum(sizes[:rank])
