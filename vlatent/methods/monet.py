"""Monet: Reasoning in Latent Visual Space Beyond Images and Language (arXiv 2511.21395).

The model thinks in K latent embeddings ``<abs_vis_token> <abs_vis_token_pad>*K </abs_vis_token>``; each pad's input
is the previous position's last hidden state (``next_latent`` is the identity). Three distillation SFT stages:

1. Warm-up: plain SFT on interleaved CoT with the real auxiliary images inline (collator ``latent_mode="image"``);
   CE is up-weighted (``observation_ce_weight``, x2) on the ``<observation>`` spans that follow each image.
2. Latent generation: the teacher is the frozen stage-1 model reading that same sequence; the student reads each
   auxiliary image followed by a latent segment (``"image+latent"``) under an attention mask where only the latent
   tokens can see the image, so everything after sees it only through the latents. Loss = weighted CE + alignment
   of the student's observation-token hidden states (all layers) to the teacher's, back-propagated only through the
   latent embeddings ("latent-only backprop").
3. Latents without images: the student (initialised from stage 1) reads ``"latent"`` sequences (no images, latents
   generated recurrently); loss = weighted CE + alignment of its latent-position hidden states (all layers) to those
   of the stage-2 model run on the stage-2 sequence.

Losses are named ``ce`` (all stages) and ``alignment`` (stages 2, 3). Collate with ``model.collator()`` (or pass
``method.collator_kwargs()`` to ``InterleavedCollator``): it adds ``observation_mask`` and, in stages 2 and 3, the
teacher's view of the same records as ``batch["teacher"]``.

Choices the paper leaves open (or where the released code is not followed):
- Observation tags are ordinary supervised tokens (the model learns to write them, so inference sequences look like
  training ones); ``supervise_tags=False`` leaves them and ``</abs_vis_token>`` unlabelled, as released. The CE
  weight applies to the tokens strictly inside the tags; CE is the weight-normalised mean ``sum(w * ce) / sum(w)``
  over supervised tokens, as released.
- Stage-2 mask: causal + padding, and the image-pad tokens of an auxiliary image (one whose closing tokens, e.g.
  ``<|vision_end|>``, are directly followed by the latent start token) are visible only to that image's own tokens
  (causally, as usual) and to the K latent pads right after it. The closing tokens, the start/end tokens, observation
  text, later images and later latent segments do not see it. Latent pads see all earlier context, as they do in
  stage 3 and at inference (the released 4-D mask hides the context from the latents and the image tokens from each
  other; its recurrent pass does not). The mask is additive in the model dtype, so it works with sdpa and eager attention (not flash).
- Latents are the student's own recurrent hidden states, computed exactly as in Mirage stage 2
  (``LatentVLM.fill_latents``: one KV-cached pass in chunks that end at the slots, backprop through the whole chain).
  The released code detaches each latent step's input (one-step gradient); this keeps the full chain.
- Alignment = mean over tokens and over all L + 1 hidden states the decoder returns (embedding output, the input of
  each later layer, the final normed output) of ``1 - cos`` taken over the hidden dimension. The released code takes
  the cosine over the token axis; not copied. Tokens are paired by order (i-th observation token of the student with
  the i-th of the teacher; i-th latent slot with the i-th); a count mismatch is an error.
- Latent-only backprop (paper: a surrogate ``stopgrad(dL_align/dh_latent) . h_latent``) is computed with a twin pass:
  ``L_align(z) - L_align(stopgrad z) + stopgrad(L_align)``, where the second pass sees the same inputs with only the
  latent slots detached. Its value is the alignment loss and its gradient is the surrogate's (the direct paths to
  the parameters and to the other inputs cancel, up to rounding), at the cost of one more forward/backward, and
  without the nested ``autograd.grad`` that DeepSpeed's backward hooks do not expect (tested with 2-process ZeRO-3).
  Needs a forward without dropout (Qwen has none). ``latent_only_backprop=False`` back-propagates the alignment
  everywhere instead. Stage 3 uses plain backprop, as released.
- Teachers are computed on the fly (no per-example disk cache): ``teacher`` is the checkpoint path (stage 2: the
  stage-1 model; stage 3: the stage-2 model), loaded lazily, frozen, in the student's dtype and device, and kept out
  of the method's modules/state dict (``set_teacher`` injects one in memory). It is a full replica on every rank,
  loaded outside ZeRO-3's partitioned init. The stage-3 teacher runs its own stage-2 sequence: the same mask and the
  same recurrent latent fill, without gradient.
- The start token's embedding is never replaced, in training or at inference (the generation loop feeds its token
  embedding and replaces only the K steps after it); the released code disagrees with itself here.
- Defaults: K = 8, observation_ce_weight = 2.0 (released stage 1; the released stage-2/3 scripts use 4.0, see the
  recipes), alignment_weight = 2.0 (released; its stage 2 also multiplies the latent-only term by 2.0, so the stage-2
  recipe uses 4.0). Stage 1 sequences hold no latent tokens; the model learns to open a latent segment in stages 2-3.
- ``centre_alignment`` (off by default, not in the paper): stage 3 subtracts, per layer, the batch's mean teacher
  state at each slot index (the j-th of K in every segment) from student and teacher before the cosine. The stage-2
  teacher's latent states of different examples share one dominant direction, so matching it alone all but zeroes
  ``1 - cos`` and the student's latents end up alike for every example (tiny base, maze: cosine 0.993 between
  examples); centred, only what sets an example's teacher states apart scores (as Mirage's ``centre_targets``).
- ZeRO-3: the number of recurrent passes is agreed across ranks (``max_over_ranks``), every pass stays in the graph
  (also where a rank has no slot left to fill, so its backward runs too) and the twin pass always runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LatentMethod, MethodConfig, additive_mask, register_method, slot_means

STAGE_LATENT_MODES = {1: "image", 2: "image+latent", 3: "latent"}
TEACHER_LATENT_MODES = {1: None, 2: "image", 3: "image+latent"}


@dataclass
class MonetConfig(MethodConfig):
    num_latent_tokens: int = 8
    latent_start_token: str = "<abs_vis_token>"
    latent_pad_token: str = "<abs_vis_token_pad>"
    latent_end_token: str = "</abs_vis_token>"
    observation_start_token: str = "<observation>"
    observation_end_token: str = "</observation>"
    observation_start_id: int | None = None
    observation_end_id: int | None = None
    observation_ce_weight: float = 2.0  # CE weight of the tokens inside <observation> ... </observation>
    alignment_weight: float = 2.0  # stages 2 and 3
    latent_only_backprop: bool = True  # stage 2: the alignment reaches the parameters only through the latents
    teacher: str | None = None  # stage 2: the stage-1 checkpoint; stage 3: the stage-2 checkpoint
    # False: as released (src/main.py:172, 235, 308 ignore_ids), <observation>, </observation> and </abs_vis_token>
    # get no label; True: the model learns to write them, so its inference text has the tags its training text had.
    supervise_tags: bool = True
    # ``latent_steps: model`` decodes as released: a segment ends at the sampled </abs_vis_token> or after
    # LATENT_SIZE = 10 latents (NOVAglow646/Monet@0893999 inference/vllm/monet_gpu_model_runner.py:1657,
    # inference/example.sh). The default stays "fixed": see docs/fidelity.md (inference).
    max_latent_steps: int | None = 10
    centre_alignment: bool = False  # stage 3: see the module docstring; not in the paper


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``(layers, n, hidden)`` x2 -> mean over layers and tokens of ``1 - cos`` over the hidden dimension."""
    if student.shape != teacher.shape:
        raise ValueError(f"student states {tuple(student.shape)} and teacher states {tuple(teacher.shape)} differ")
    if student.shape[1] == 0:
        return student.sum() * 0.0  # keeps the graph (and ZeRO-3 ranks) uniform
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def stage2_allowed(input_ids, attention_mask, *, image_token_id: int, latent_start_id: int,
                   latent_pad_id: int, image_trailer: int = 1) -> torch.Tensor:
    """(batch, seq, seq) bool, True where query row may attend to key column: causal, no padded keys, and the
    image-pad tokens of each auxiliary image (its ``image_trailer`` closing tokens, e.g. ``<|vision_end|>``, are
    followed by the latent start token) visible only to that image's own tokens and to the latent pads after it."""
    n, length = input_ids.shape
    device = input_ids.device
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril().expand(n, length, length).clone()
    allowed &= attention_mask.bool()[:, None, :]
    is_img = input_ids == image_token_id
    starts = is_img & ~F.pad(is_img, (1, 0))[:, :-1]
    ends = is_img & ~F.pad(is_img, (0, 1))[:, 1:]
    for b in range(n):
        ids = input_ids[b].tolist()
        for a, e in zip(starts[b].nonzero().flatten().tolist(), ends[b].nonzero().flatten().tolist()):
            s = e + 1 + image_trailer  # image pads [a, e], the image's closing tokens, then the latent start token
            if s >= length or ids[s] != latent_start_id:
                continue  # a question image (or any image not followed by a latent segment): visible to all
            pads = s + 1
            while pads < length and ids[pads] == latent_pad_id:
                pads += 1
            allowed[b, e + 1:, a:e + 1] = False
            allowed[b, s + 1:pads, a:e + 1] = True
    return allowed


@contextlib.contextmanager
def _no_zero3_init():
    """Load a model whole even while a ZeRO-3 run is set up (transformers would otherwise partition it at init)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


@register_method
class Monet(LatentMethod):
    name = "monet"
    config_class = MonetConfig
    stages = tuple(STAGE_LATENT_MODES)

    def __init__(self, config: MonetConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        if config.stage not in STAGE_LATENT_MODES:
            raise ValueError(f"monet has stages 1, 2 and 3, got stage={config.stage}")
        if config.observation_ce_weight <= 0 or config.alignment_weight < 0:
            raise ValueError("monet: observation_ce_weight must be > 0 and alignment_weight >= 0, got "
                             f"{config.observation_ce_weight} and {config.alignment_weight}")
        self._teacher: list = []  # a plain list: the teacher is never a submodule (not trained, not saved)

    # -- tokens and data ----------------------------------------------------------------------------
    def special_tokens(self):
        c = self.config
        return super().special_tokens() + [c.observation_start_token, c.observation_end_token]

    def resolve_token_ids(self, tokenizer) -> None:
        super().resolve_token_ids(tokenizer)
        c = self.config
        for attr, tok in (("observation_start_id", c.observation_start_token),
                          ("observation_end_id", c.observation_end_token)):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"token {tok!r} of method 'monet' is not in the tokenizer")
            setattr(c, attr, int(tid))

    def latent_mode(self) -> str:
        return STAGE_LATENT_MODES[self.config.stage]

    def collator_kwargs(self) -> dict:
        """What ``InterleavedCollator`` needs beyond the latent tokens and mode for this stage."""
        c = self.config
        tags = () if c.supervise_tags else (c.observation_start_token, c.observation_end_token, c.latent_end_token)
        return {"observation_tokens": (c.observation_start_token, c.observation_end_token),
                "teacher_latent_mode": TEACHER_LATENT_MODES[c.stage], "latent_targets": False,
                "unsupervised_tokens": tags}

    # -- teacher ------------------------------------------------------------------------------------
    def set_teacher(self, teacher) -> None:
        """Use ``teacher`` (a ``LatentVLM``) as this stage's frozen teacher instead of loading ``config.teacher``."""
        if teacher.method.name != "monet":
            raise ValueError(f"the monet teacher must be a monet checkpoint, got method {teacher.method.name!r}")
        c, tc = self.config, teacher.method.config
        same = ["latent_start_id", "latent_pad_id", "latent_end_id", "observation_start_id", "observation_end_id"]
        if c.stage == 3:  # the stage-2 teacher's latent slots pair with the student's one to one
            same.append("num_latent_tokens")
        for attr in same:
            if getattr(c, attr) is not None and getattr(c, attr) != getattr(tc, attr):
                raise ValueError(f"teacher and student disagree on {attr}: {getattr(tc, attr)} vs {getattr(c, attr)}")
        teacher.requires_grad_(False)
        teacher.eval()
        self._teacher[:] = [teacher]

    def teacher(self, like):
        """The frozen teacher, loaded on first use from ``config.teacher`` onto ``like``'s device and dtype."""
        if not self._teacher:
            if self.config.teacher is None:
                want = "stage-1" if self.config.stage == 2 else "stage-2"
                raise ValueError(f"monet stage {self.config.stage} needs a teacher: set method_config teacher= to the "
                                 f"{want} checkpoint (or call method.set_teacher(model))")
            from ..model import LatentVLM

            with _no_zero3_init():
                loaded = LatentVLM.from_pretrained(self.config.teacher, dtype=like.dtype, teacher=None)
            self.set_teacher(loaded)
        t = self._teacher[0]
        if t.device != like.device:
            t.to(like.device)
        return t

    # -- training -----------------------------------------------------------------------------------
    def loss_weights(self):
        if self.config.stage == 1:
            return {"ce": 1.0}
        return {"ce": 1.0, "alignment": self.config.alignment_weight}

    def next_latent(self, hidden, context=None):
        return hidden

    def training_losses(self, model, batch):
        need = ["observation_mask"] + (["teacher"] if self.config.stage > 1 else [])
        missing = [k for k in need if k not in batch]
        if missing:
            raise ValueError(f"monet stage {self.config.stage}: the batch has no {missing}; collate with "
                             "model.collator() (InterleavedCollator with "
                             "**method.collator_kwargs())")
        if self.config.stage == 1:
            return self._stage1(model, batch)
        if self.config.stage == 2:
            return self._stage2(model, batch)
        return self._stage3(model, batch)

    def observation_ce(self, model, hidden, batch) -> torch.Tensor:
        """Next-token CE on supervised positions, tokens inside observation spans weighted by
        ``observation_ce_weight``; normalised by the sum of the weights."""
        target = batch["labels"][:, 1:]
        keep = target != -100
        if not keep.any():
            return hidden.sum() * 0.0
        weights = torch.where(batch["observation_mask"][:, 1:][keep], self.config.observation_ce_weight, 1.0)
        logits = model.backbone.logits(hidden[:, :-1][keep]).float()
        ce = F.cross_entropy(logits, target[keep], reduction="none")
        return (ce * weights).sum() / weights.sum()

    def stage2_mask(self, model, batch, dtype) -> torch.Tensor:
        """The stage-2 additive (batch, 1, seq, seq) mask of a batch collated with ``"image+latent"``."""
        model.require_4d_masks("monet stage 2")
        c = model.method.config
        ids = batch["input_ids"]
        from ..data.chat import image_trailer_length

        trailer = image_trailer_length(model.processor)  # tokens closing an image: the family's template
        allowed = stage2_allowed(ids, batch["attention_mask"], image_token_id=model.backbone.image_token_id,
                                 latent_start_id=c.latent_start_id, latent_pad_id=c.latent_pad_id,
                                 image_trailer=trailer)
        if model.bottlenecked:
            allowed &= model.bottleneck_allowed(ids, batch["attention_mask"])
        # every latent segment must follow an auxiliary image (image pad, its closing tokens, start), else the batch
        # was collated for another stage
        starts = ids == c.latent_start_id
        after_image = F.pad(ids == model.backbone.image_token_id, (trailer + 1, 0))[:, :ids.shape[1]]
        if bool((starts & ~after_image).any()):
            raise ValueError(f"batch {batch.get('ids')}: a latent segment does not follow an auxiliary image; stage-2 "
                             'sequences are collated with latent_mode="image+latent"')
        return additive_mask(allowed, dtype)

    def _stage1(self, model, batch):
        hidden = model.run_language_model(model.embed_inputs(batch), batch).last_hidden_state
        return {"ce": self.observation_ce(model, hidden, batch)}

    def _stage2(self, model, batch):
        teacher_states = self._teacher_observation_states(self.teacher(model), batch["teacher"])
        embeds = model.embed_inputs(batch)
        positions = model.position_ids(batch)
        mask = self.stage2_mask(model, batch, embeds.dtype)
        filled, out, (b, t) = model.fill_latents(embeds, batch, positions, mask, output_hidden_states=True)
        obs = batch["observation_mask"]
        student = torch.stack([h[obs] for h in out.hidden_states])  # (layers, n_obs, hidden)
        self._check_count(batch, "observation tokens", student.shape[1], teacher_states.shape[1])
        align = alignment_loss(student, teacher_states)
        if self.config.latent_only_backprop:
            # twin pass: same inputs, only the latent slots detached; its gradient cancels every path but the latents
            slot = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            slot[b, t] = True
            twin_in = torch.where(slot[..., None], filled.detach(), filled)
            twin = model.run_language_model(twin_in, batch, positions=positions, mask=mask, output_hidden_states=True)
            align_twin = alignment_loss(torch.stack([h[obs] for h in twin.hidden_states]), teacher_states)
            align = align - align_twin + align_twin.detach()
        return {"ce": self.observation_ce(model, out.last_hidden_state, batch), "alignment": align}

    def _stage3(self, model, batch):
        teacher_states = self._teacher_latent_states(self.teacher(model), batch["teacher"])
        embeds = model.embed_inputs(batch)
        positions = model.position_ids(batch)
        _, out, (b, t) = model.fill_latents(embeds, batch, positions, model.decoder_mask(batch, embeds.dtype),
                                            output_hidden_states=True)
        student = torch.stack([h[b, t] for h in out.hidden_states])  # (layers, n_slots, hidden)
        self._check_count(batch, "latent slots", student.shape[1], teacher_states.shape[1])
        if self.config.centre_alignment:
            mean = slot_means(teacher_states, self.config.num_latent_tokens)  # (layers, n_slots, hidden)
            student, teacher_states = student - mean, teacher_states - mean
        return {"ce": self.observation_ce(model, out.last_hidden_state, batch),
                "alignment": alignment_loss(student, teacher_states)}

    @staticmethod
    def _check_count(batch, what, n_student, n_teacher):
        if n_student != n_teacher:
            raise ValueError(f"batch {batch.get('ids')}: {n_student} {what} in the student sequence but {n_teacher} in "
                             "the teacher's; were they collated with different settings?")

    @torch.no_grad()
    def _teacher_observation_states(self, teacher, tbatch) -> torch.Tensor:
        """Stage 2: the stage-1 teacher on the sequence with the auxiliary images inline -> (layers, n_obs, hidden)."""
        embeds = teacher.embed_inputs(tbatch)
        out = teacher.run_language_model(embeds, tbatch, output_hidden_states=True)
        return torch.stack([h[tbatch["observation_mask"]] for h in out.hidden_states])

    @torch.no_grad()
    def _teacher_latent_states(self, teacher, tbatch) -> torch.Tensor:
        """Stage 3: the stage-2 teacher on its own stage-2 sequence (images, latents, stage-2 mask), latents filled
        recurrently -> the hidden states at its latent slots, (layers, n_slots, hidden)."""
        embeds = teacher.embed_inputs(tbatch)
        positions = teacher.position_ids(tbatch)
        mask = self.stage2_mask(teacher, tbatch, embeds.dtype)
        _, out, (b, t) = teacher.fill_latents(embeds, tbatch, positions, mask, output_hidden_states=True)
        return torch.stack([h[b, t] for h in out.hidden_states])
