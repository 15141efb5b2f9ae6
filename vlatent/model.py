"""``LatentVLM``: a backbone adapter + a latent method + the processor. The one object trainers, evaluators and
the demo talk to.

A checkpoint is a plain HF checkpoint of the backbone (safetensors, loadable by ``transformers`` alone) plus
``vlatent_config.json`` (method name and config, token ids) and ``method.safetensors`` (the method's own
modules, when it has any).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoProcessor
from transformers.utils import ModelOutput

from . import __version__
from .backbones import Backbone, BackboneOutput, backbone_class
from .backbones.base import place_images
from .methods import LatentMethod, create_method, list_methods, method_class
from .methods.base import additive_mask, bottleneck_allowed

VLATENT_CONFIG = "vlatent_config.json"
METHOD_WEIGHTS = "method.safetensors"


@dataclass
class LatentVLMOutput(ModelOutput):
    loss: torch.Tensor | None = None  # weighted sum of ``losses``
    losses: dict[str, torch.Tensor] | None = None  # unweighted, by name


def _resolve(path_or_hub_id: str | os.PathLike, trust_remote_code: bool):
    """Local directory or hub id -> (where to load from, HF config); clear errors for anything else."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{str(path)!r} is a directory but not a model: it has no config.json")
        return str(path), AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    name = str(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name!r} is not a model directory or a hub id (org/name)")
    try:
        return name, AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"could not load {name!r} as a local directory or from the hub: {e}") from e


class LatentVLM(nn.Module):
    def __init__(self, backbone: Backbone, method: LatentMethod, processor):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.processor = processor
        self.lockstep = False  # set while every rank runs the same forwards outside training (the Trainer's eval)

    # -- loading and saving ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id, method: str | None = None, *, dtype=None, attn_implementation=None,
                        trust_remote_code: bool = False, **latent_cfg) -> "LatentVLM":
        """Load a vlatent checkpoint, or a base VLM (adding the method's tokens and resizing the embeddings).

        ``latent_cfg`` overrides method config fields (``num_latent_tokens=8``, ``stage=2``, ...).
        """
        source, hf_config = _resolve(path_or_hub_id, trust_remote_code)
        saved = None
        if Path(source, VLATENT_CONFIG).is_file():
            saved = json.loads(Path(source, VLATENT_CONFIG).read_text())
            if method is not None and method != saved["method"]:
                raise ValueError(f"{source!r} is a {saved['method']!r} checkpoint; got method={method!r}")
            method = saved["method"]
        elif method is None:
            raise ValueError(f"{source!r} is a base model: pass method= (one of {', '.join(list_methods())})")
        method_class(method)  # unknown names fail before any weights load

        backbone_cls = backbone_class(hf_config.model_type)
        kwargs = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        hf_model = backbone_cls.model_class.from_pretrained(source, **kwargs)
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        backbone = backbone_cls(hf_model)

        config = dict(saved["method_config"]) if saved else {}
        config.update(latent_cfg)
        config = method_class(method).backbone_config(config, backbone, processor)
        latent = create_method(method, backbone.hidden_size, config)
        if saved is None:
            _add_tokens(backbone, processor.tokenizer, latent.special_tokens())
        else:
            latent.load_files(Path(source))
        latent.resolve_token_ids(processor.tokenizer)
        if saved and Path(source, METHOD_WEIGHTS).is_file():
            try:
                latent.load_state_dict(load_file(str(Path(source, METHOD_WEIGHTS))))
            except RuntimeError as e:  # missing / unexpected / misshapen keys
                raise ValueError(f"{str(Path(source, METHOD_WEIGHTS))!r} does not fit method {method!r} as this "
                                 f"vlatent builds it (written by another version?): {e}") from e
        latent.to(device=hf_model.device, dtype=hf_model.dtype)
        return cls(backbone, latent, processor)

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Write the checkpoint. ``state_dict`` (keys as in ``self.state_dict()``) replaces the live weights, as
        the Trainer passes the consolidated ZeRO-3 weights."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        backbone = {k.removeprefix("backbone.model."): v for k, v in state.items() if k.startswith("backbone.model.")}
        method = {k.removeprefix("method."): v.detach().contiguous().cpu()
                  for k, v in state.items() if k.startswith("method.")}
        self.backbone.model.save_pretrained(out, state_dict=backbone)
        self.processor.save_pretrained(out)
        if method:
            save_file(method, str(out / METHOD_WEIGHTS))
        self.method.save_files(out)
        (out / VLATENT_CONFIG).write_text(json.dumps({
            "vlatent_version": __version__, "family": self.backbone.family,
            "method": self.method.name, "method_config": self.method.config.to_dict()}, indent=2))
        return out

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load the weights of a checkpoint written by ``save_pretrained`` into this model, in place (goes through
        the backbone's ``from_pretrained``, which knows the on-disk key layout)."""
        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a vlatent checkpoint: it has no config.json")
        loaded = type(self.backbone.model).from_pretrained(path, dtype=self.dtype)
        self.backbone.model.load_state_dict(loaded.state_dict())
        if Path(path, METHOD_WEIGHTS).is_file():
            self.method.load_state_dict(load_file(str(Path(path, METHOD_WEIGHTS))))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Activation checkpointing of the backbone, non-reentrant (works with frozen inputs and ZeRO-3)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def config(self):
        """The backbone's HF config (what the Trainer and DeepSpeed read, e.g. hidden sizes)."""
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return self.backbone.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.model.dtype

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # -- training --------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> LatentVLMOutput:
        """One training forward on a collated batch: the method's named losses and their weighted sum."""
        losses = self.method.training_losses(self, batch)
        weights = self.method.loss_weights()
        loss = sum(weights.get(name, 1.0) * value for name, value in losses.items())
        return LatentVLMOutput(loss=loss, losses=losses)

    def collator(self, **kwargs):
        """The data collator configured for this model's method (latent tokens, K, what a latent step becomes)."""
        from .data import InterleavedCollator

        uses = self.method.uses_latents
        return InterleavedCollator(
            self.processor, latent_tokens=self.method.config.latent_tokens if uses else None,
            num_latent_tokens=self.method.config.num_latent_tokens, latent_mode=self.method.latent_mode(),
            **{**self.method.collator_kwargs(), **kwargs})

    # building blocks the methods compose -----------------------------------------------------------------
    @property
    def uniform_compute(self) -> bool:
        """True when training (or evaluating in lockstep) on several ranks: every rank must then run the same modules
        the same number of times per step (ZeRO-3 gathers parameters module by module), whatever its batch holds.
        Sharded inference (`vlatent eval` under torchrun) runs each rank alone and is not in lockstep."""
        return ((self.training or self.lockstep) and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def max_over_ranks(self, n: int) -> int:
        """``n`` agreed across ranks (its maximum) when ``uniform_compute``, else ``n``."""
        if not self.uniform_compute:
            return n
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def embed_inputs(self, batch) -> torch.Tensor:
        """(batch, seq, hidden): token embeddings with inline images scattered in. Also sets
        ``batch["visual_context"]``: what the decoder needs about the images besides their embeddings (Gemma 3's image
        blocks, Qwen3-VL's DeepStack features), which ``run_language_model`` and ``fill_latents`` hand on to it."""
        embeds, batch["visual_context"] = self.backbone.embed_multimodal(
            batch["input_ids"], batch.get("pixel_values"), batch.get("image_grid_thw"), uniform=self.uniform_compute)
        return embeds

    def position_ids(self, batch) -> torch.Tensor:
        """The family's position ids of a batch, its latent slots placed as the method's latents sit."""
        positions = self.backbone.position_ids(batch["input_ids"], batch.get("mm_token_type_ids"),
                                               batch.get("image_grid_thw"), batch["attention_mask"])
        if not self.method.uses_latents:
            return positions
        return self.place_latents(positions, batch["input_ids"] == self.method.config.latent_pad_id)

    def place_latents(self, positions, slots) -> torch.Tensor:
        """``positions`` computed with the latent ``slots`` (batch, seq) bool as text, with each latent segment moved
        where ``method.latent_positions`` puts it (sketchpad: the image positions of a sketch; others: unchanged)."""
        offsets = self.method.latent_positions(self.backbone)
        return positions if offsets is None else place_images(positions, slots, offsets)

    def run_language_model(self, embeds, batch, positions=None, output_hidden_states=False, mask=None):
        """The decoder over ``embeds`` of a batch that went through ``embed_inputs``. ``mask``: a method's own additive
        4-D mask instead of ``decoder_mask``."""
        positions = self.position_ids(batch) if positions is None else positions
        mask = self.decoder_mask(batch, embeds.dtype) if mask is None else mask
        return self.backbone(embeds, positions, mask, output_hidden_states=output_hidden_states,
                             visual=batch.get("visual_context"))

    def decoder_mask(self, batch, dtype: torch.dtype) -> torch.Tensor:
        """The mask a batch runs the decoder under: its 2-D padding mask, or under the method's ``latent_bottleneck``
        the additive (batch, 1, seq, seq) mask of ``bottleneck_allowed``."""
        if not self.bottlenecked:
            return batch["attention_mask"]
        return additive_mask(self.bottleneck_allowed(batch["input_ids"], batch["attention_mask"]), dtype)

    @property
    def bottlenecked(self) -> bool:
        """True when what follows a row's first latent start sees what precedes it only through the latents
        (``latent_bottleneck``)."""
        return self.method.uses_latents and self.method.config.latent_bottleneck

    def bottleneck_allowed(self, input_ids, attention_mask) -> torch.Tensor:
        """``vlatent.methods.base.bottleneck_allowed`` with this model's latent start token: (batch, seq, seq) bool."""
        self.require_4d_masks("latent_bottleneck")
        return bottleneck_allowed(input_ids, attention_mask, self.method.config.latent_start_id)

    def require_4d_masks(self, what: str) -> None:
        """Refuse, by name, an attention implementation that cannot take a 4-D mask (flash attention)."""
        impl = getattr(self.backbone.config, "_attn_implementation", None) or ""
        if impl.startswith("flash"):
            raise ValueError(f"{what} needs a 4-D attention mask, which attn_implementation={impl!r} does not take; "
                             "load the model with attn_implementation='sdpa' or 'eager'")

    def fill_latents(self, embeds, batch, positions, mask, output_hidden_states=False, next_latent=None):
        """Fill every latent slot with ``method.next_latent`` of the previous position's last hidden state,
        recurrently and exactly (each latent sees the ones before it), and run the decoder over the result.

        With the KV cache the sequence runs once, in chunks that end where a slot begins: about one forward.
        Gradient checkpointing drops the cache, so then pass j recomputes each row up to its j-th slot instead.
        ``mask``: the 2-D padding mask or an additive ``(batch, 1, seq, seq)`` mask. ``next_latent``: a method's own
        ``(hidden (n, H), batch rows (n,), slot positions (n,)) -> latents (n, H)`` when a latent needs more than
        the hidden state (CoCoVa's earlier thoughts); it is called in slot order within each row. Returns
        ``(filled embeds, BackboneOutput over them, (batch index, position) of the slots)``.
        """
        b, t = self.latent_slots(batch)
        if next_latent is None:
            next_latent = lambda hidden, rows, slots: self.method.next_latent(hidden)  # noqa: E731
        if any(getattr(m, "gradient_checkpointing", False) for m in self.backbone.model.modules()):
            return self._fill_latents_multipass(embeds, batch, positions, mask, output_hidden_states, b, t,
                                                next_latent)
        from transformers import DynamicCache

        length = embeds.shape[1]
        bounds = sorted({0, length, *t.tolist()})
        # ZeRO-3: every rank runs the same number of forwards, so split the longest chunks until the counts agree
        n_chunks = self.max_over_ranks(len(bounds) - 1)
        while len(bounds) - 1 < n_chunks:
            i = max(range(len(bounds) - 1), key=lambda j: bounds[j + 1] - bounds[j])
            if bounds[i + 1] - bounds[i] < 2:
                raise ValueError(f"batch {batch.get('ids')}: too short to split into {n_chunks} chunks")
            bounds.insert(i + 1, (bounds[i] + bounds[i + 1]) // 2)
        cache, outs = DynamicCache(config=self.backbone.model.config.get_text_config()), []
        for start, end in zip(bounds, bounds[1:]):
            if start > 0:  # the slots at ``start`` take the state that precedes them (called even with none: ZeRO-3)
                rows = b[t == start]
                slots = torch.full_like(rows, start)
                z = next_latent(outs[-1].last_hidden_state[rows, -1], rows, slots).to(embeds.dtype)
                embeds = embeds.index_put((rows, slots), z)
            m = mask[:, :end] if mask.dim() == 2 else mask[:, :, start:end, :end]
            outs.append(self.backbone(embeds[:, start:end], positions[..., start:end], m, past_key_values=cache,
                                      use_cache=True, output_hidden_states=output_hidden_states,
                                      visual=batch.get("visual_context")))
        out = BackboneOutput(last_hidden_state=torch.cat([o.last_hidden_state for o in outs], dim=1))
        if output_hidden_states:
            out.hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*(o.hidden_states for o in outs)))
        return embeds, out, (b, t)

    def _fill_latents_multipass(self, embeds, batch, positions, mask, output_hidden_states, b, t, next_latent):
        is_slot = torch.zeros_like(batch["input_ids"])
        is_slot[b, t] = 1
        ordinal = (is_slot.cumsum(1) - 1)[b, t]  # pass j fills every row's j-th slot
        n_passes = self.max_over_ranks(int(ordinal.max()) + 1 if b.numel() else 0)
        for j in range(n_passes):
            bj, tj = b[ordinal == j], t[ordinal == j]
            upto = int(tj.max()) if bj.numel() else 1  # states at tj - 1 only need positions < upto
            m = mask[:, :upto] if mask.dim() == 2 else mask[:, :, :upto, :upto]
            hidden = self.backbone(embeds[:, :upto], positions[..., :upto], m,
                                   visual=batch.get("visual_context")).last_hidden_state
            # also with no slot in this pass: the (empty) write keeps the pass in the graph, so every rank runs its
            # backward too (ZeRO-3 gathers parameters in backward as well: see ``uniform_compute``)
            embeds = embeds.index_put((bj, tj), next_latent(hidden[bj, tj - 1], bj, tj).to(embeds.dtype))
        out = self.backbone(embeds, positions, mask, output_hidden_states=output_hidden_states,
                            visual=batch.get("visual_context"))
        return embeds, out, (b, t)

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token CE on supervised positions only (the LM head never sees the rest)."""
        target = labels[:, 1:]
        keep = target != -100
        if not keep.any():
            return hidden.sum() * 0.0
        logits = self.backbone.logits(hidden[:, :-1][keep]).float()  # (n_supervised, vocab)
        return F.cross_entropy(logits, target[keep])

    def latent_slots(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, position) of every latent pad, row-major: the order targets come in."""
        return (batch["input_ids"] == self.method.config.latent_pad_id).nonzero(as_tuple=True)

    @torch.no_grad()
    def latent_targets(self, batch) -> list[torch.Tensor]:
        """Helper images through the frozen vision tower + projector: one (n_tokens, hidden) per latent segment."""
        if batch.get("latent_target_pixel_values") is None:
            if self.uniform_compute:  # keep the tower's call count equal on every rank
                self.backbone.encode_images(*self.backbone.dummy_image_inputs())
            return []
        return self.backbone.encode_images(batch["latent_target_pixel_values"], batch["latent_target_grid_thw"])

    def check_latent_targets(self, slots, targets, batch) -> None:
        if slots[0].numel() != targets.shape[0]:
            raise ValueError(
                f"batch {batch.get('ids')}: {slots[0].numel()} latent pad tokens but {targets.shape[0]} latent targets "
                f"(K={self.method.config.num_latent_tokens}); was the batch collated for another method or K?")

    # -- inference -------------------------------------------------------------------------------------
    def generate(self, images, prompts, **kwargs):
        """Interleaved text/latent generation; see ``vlatent.generation.generate``. ``prompts``: a string, chat
        messages (``[{"role": "system" | "user" | "assistant", "content": ...}, ...]``, the user's last), or a list of
        either, one per row. Options: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``prefix``,
        ``latent_steps``, ``allow_latents``, ``latent_sigma``, ``generator``, ``use_cache`` and the streaming and
        intervention hooks; transformers' other generation options (``num_beams``, ``top_k``, ...) are refused."""
        import inspect

        from .generation import generate

        supported = set(inspect.signature(generate).parameters) - {"model", "images", "prompts"}
        if unknown := sorted(set(kwargs) - supported):
            raise TypeError(f"LatentVLM.generate does not support {', '.join(unknown)}: the latent decode loop is "
                            f"greedy or temperature / top-p sampling, one sequence per prompt; its options are "
                            f"{', '.join(sorted(supported))}")
        return generate(self, images, prompts, **kwargs)


def _add_tokens(backbone: Backbone, tokenizer, tokens: list[str]) -> None:
    """Add the method's special tokens; grow the embeddings if needed and start the new rows at the mean row."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if not new:
        return
    tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    model = backbone.model
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(new)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight[ids] = emb.weight[: min(ids)].mean(0, keepdim=True).to(emb.weight.dtype)
