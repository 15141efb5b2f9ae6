"""What ``LatentVLM`` needs from a VLM family, and the registry keyed by the HF ``model_type``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

# transformers 5.24 renamed the decoders' cache argument and output field from `past_key_values` to `cache`
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class BackboneOutput(ModelOutput):
    """Language-model pass over ``inputs_embeds``."""

    last_hidden_state: torch.Tensor | None = None  # (batch, seq, hidden), after the final norm
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, when asked for


@dataclass(frozen=True)
class ChatFormat:
    """How a family's chat template marks turns and images: what the collator needs to find the assistant turns it
    supervises and the tokens it never supervises, and what generation stops on."""

    turn_start: str = "<|im_start|>"  # opens a turn, followed by the role and a newline
    turn_end: str = "<|im_end|>"  # closes a turn (supervised at the end of an assistant turn)
    assistant_role: str = "assistant"  # the role as the template writes it (Gemma: "model")
    image_markers: tuple[str, ...] = ()  # tokens around each image's placeholder run, never supervised


@dataclass
class VisualContext:
    """What the decoder needs about a sequence's images besides their embeddings (``Backbone.embed_multimodal``): where
    the image tokens are (Gemma 3 lets an image's tokens attend to each other both ways) and Qwen3-VL's DeepStack
    features, added to the image tokens' hidden states after the first decoder layers. Covers the whole sequence;
    ``window`` gives the part a forward over some positions needs (a prefix, a decode step past the prompt)."""

    image_mask: torch.Tensor  # (batch, seq) bool: image placeholder tokens
    deepstack: tuple[torch.Tensor, ...] = ()  # per injected decoder layer: (n_image_tokens, hidden), row-major

    def window(self, start: int, length: int) -> "VisualContext":
        """Positions ``[start, start + length)``; positions past the sequence (generated tokens) hold no image."""
        mask = self.image_mask[:, start:start + length]
        mask = F.pad(mask, (0, length - mask.shape[1]), value=False)  # (batch, length)
        deepstack = self.deepstack
        if deepstack:
            t = self.image_mask.nonzero()[:, 1]  # position of each image token, in feature order
            keep = (t >= start) & (t < start + length)
            deepstack = tuple(d[keep] for d in deepstack)
        return VisualContext(mask, deepstack)


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions of a padded batch, (batch, seq): 0, 1, ... over each row's real tokens (pads get 0, masked)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def place_images(positions: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``positions`` ((3, batch, seq) or (batch, seq)) computed with the ``slots`` (batch, seq) bool as text tokens,
    with each run of slots made an image: its j-th token at the run's first position + ``offsets[..., j]``
    (``Backbone.image_positions``, for n tokens; a run holds at most n) and everything after it moved so that the next
    token takes the image's largest position + 1, as the family continues after a real image (Qwen's rope deltas)."""
    positions, offsets = positions.clone(), offsets.to(positions.device)
    first = slots & ~F.pad(slots, (1, 0))[:, :-1]  # (batch, seq): a run's first slot
    last = slots & ~F.pad(slots, (0, 1))[:, 1:]  # (batch, seq): a run's last slot
    for (row, start), (_, end) in zip(first.nonzero().tolist(), last.nonzero().tolist()):  # row-major, in order
        length = end + 1 - start
        if length > offsets.shape[-1]:
            raise ValueError(f"a run of {length} image slots; an image here is {offsets.shape[-1]} tokens")
        at = positions[..., row, start]  # (3,) or (): a text position, the same on every axis
        placed = at[..., None] + offsets[..., :length]  # (3, length) or (length,)
        positions[..., row, start:end + 1] = placed
        positions[..., row, end + 1:] += placed.max() + 1 - (at.max() + length)  # pads after it: masked anyway
    return positions


class Backbone(nn.Module):
    """Adapter over one HF VLM. Subclasses wrap the model as ``self.model`` and implement the hooks."""

    family: str = ""
    model_class: type | None = None
    processor_class: type | None = None  # the HF processor class of the family (how the data side finds the adapter)
    chat_format: ChatFormat = ChatFormat()

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        """Width of the decoder (every supported family keeps it in ``text_config``)."""
        return self.config.text_config.hidden_size

    @property
    def image_token_id(self) -> int:
        """The placeholder token each image token of the sequence stands on."""
        return self.config.image_token_id

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) -> (batch, seq, hidden)."""
        return self.model.get_input_embeddings()(input_ids)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Vision tower + projector into LM space, one ``(n_tokens_i, hidden)`` tensor per image."""
        raise NotImplementedError

    def position_ids(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
        """Position ids for a padded batch as the model itself computes them."""
        raise NotImplementedError

    def step_position_ids(self, next_pos: torch.Tensor) -> torch.Tensor:
        """Position ids of one new token per row at positions ``next_pos`` (n,), shaped as ``position_ids`` returns
        them for a one-token sequence: 1-D ``(n, 1)`` here; M-RoPE families advance every axis alike."""
        return next_pos[:, None]

    @classmethod
    def pack_images(cls, processor, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's image outputs as ``(pixel_values, image_grid_thw)``: every image's pixels concatenated along
        dim 0 and one row of geometry per image (what ``encode_images`` reads), so batches concatenate."""
        return outputs["pixel_values"], outputs["image_grid_thw"]

    @classmethod
    def fixed_size_images_kwargs(cls, processor, size: int) -> dict:
        """Image-processor kwargs under which every ``size x size`` picture gets the same token grid (Latent Sketchpad's
        sketches). None here: a fixed-resolution family resizes every image to its one input size anyway."""
        return {}

    def image_inputs_for_lm(self, pixel_values, image_grid_thw) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """``encode_images`` plus what the decoder takes besides the image embeddings: DeepStack features for the
        image tokens, one ``(n_image_tokens, hidden)`` tensor per injected layer (none here)."""
        return self.encode_images(pixel_values, image_grid_thw), ()

    def image_positions(self, image_grid_thw: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Position ids of one image's ``n_tokens`` LM tokens from the image's first position, shaped as
        ``position_ids`` gives one row's: ``(n_tokens,)`` here, 1-D families' images taking consecutive positions as
        text does; ``(3, n_tokens)`` on M-RoPE. The text after an image continues at its largest position + 1
        (``place_images``; where a sketch stands in for an image, Latent Sketchpad's)."""
        return torch.arange(n_tokens)

    def token_grid(self, image_grid_thw: torch.Tensor, n_tokens: int) -> tuple[int, int]:
        """(rows, cols): how the first ``rows * cols`` of one image's ``n_tokens`` LM tokens tile the picture, in
        raster order (heat maps over the image). Default: a square of all of them (Gemma 3's pooled tokens)."""
        side = int(n_tokens**0.5)
        if side * side != n_tokens:
            raise ValueError(f"{self.family}: {n_tokens} image tokens do not form a square grid")
        return side, side

    # -- the vision encoder's own feature space (Latent Sketchpad's latents live there) -----------------
    @property
    def vision_feature_size(self) -> int:
        """Width of the vision encoder's output before the merger / projector (1280 for Qwen2.5-VL-7B)."""
        return self.config.vision_config.hidden_size

    def vision_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Vision encoder output BEFORE the merger / projector, one ``(n_tokens_i * per_token, vision_feature_size)``
        tensor per image: each run of ``vision_features_per_token`` consecutive rows is what the projector fuses into
        one LM token, the runs in the order ``encode_images`` returns the tokens."""
        raise NotImplementedError

    def project_vision_features(self, features: torch.Tensor) -> torch.Tensor:
        """The backbone's own merger / projector: ``(n * per_token, vision_feature_size) -> (n, hidden)``, so that
        ``project_vision_features(vision_features(x)[i])`` equals ``encode_images(x)[i]``."""
        raise NotImplementedError

    @property
    def vision_feature_norm(self) -> nn.Module | None:
        """The projector's own per-vector norm over ``vision_features`` rows (Qwen2.5-VL: ``merger.ln_q``), the space
        Latent Sketchpad's release regresses sketches in; None where the projector has none before pooling."""
        return None

    @property
    def vision_features_per_token(self) -> int:
        """How many vision-encoder vectors the projector fuses into one LM token (read off the smallest image)."""
        pixel_values, grid = self.dummy_image_inputs()
        with torch.no_grad():
            n_features = self.vision_features(pixel_values, grid)[0].shape[0]
            return n_features // self.encode_images(pixel_values, grid)[0].shape[0]

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key_values=None, use_cache=False,
                output_hidden_states=False, visual: VisualContext | None = None) -> BackboneOutput:
        """The decoder over ``inputs_embeds``. ``attention_mask``: 2-D padding mask or a method's additive 4-D mask.
        ``visual`` (from ``embed_multimodal``, for the whole sequence) where the family needs it past the embeddings;
        here the HF model's own decoder, ``model.model.language_model``, which needs nothing more."""
        return self.run_decoder(inputs_embeds, position_ids, attention_mask, past_key_values, use_cache,
                                output_hidden_states)

    def run_decoder(self, inputs_embeds, position_ids, attention_mask, past_key_values, use_cache,
                    output_hidden_states, **decoder_kwargs) -> BackboneOutput:
        """``model.model.language_model`` over the embeddings, with any family-specific ``decoder_kwargs``."""
        out = self.model.model.language_model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
            use_cache=use_cache, output_hidden_states=output_hidden_states, **{CACHE: past_key_values},
            **decoder_kwargs)
        return BackboneOutput(last_hidden_state=out.last_hidden_state, past_key_values=getattr(out, CACHE),
                              hidden_states=out.hidden_states if output_hidden_states else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: (..., hidden) -> (..., vocab)."""
        return self.model.get_output_embeddings()(hidden)

    def parts(self) -> dict[str, list[nn.Module]]:
        """The named parts users freeze: ``vision_tower``, ``multi_modal_projector``, ``language_model``."""
        raise NotImplementedError

    def dummy_image_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values, image_grid_thw) of the smallest image the vision tower accepts (see ``embed_inputs``)."""
        raise NotImplementedError

    def embed_inputs(self, input_ids, pixel_values=None, image_grid_thw=None, uniform: bool = False) -> torch.Tensor:
        """Token embeddings with each image's features scattered over its image-pad tokens. (batch, seq, hidden).

        ``uniform=True`` runs the vision tower on a dummy image when the batch has none, added at weight 0:
        under ZeRO-3 every rank must run the same modules each step, or the parameter all-gathers hang.
        """
        return self.embed_multimodal(input_ids, pixel_values, image_grid_thw, uniform)[0]

    def embed_multimodal(self, input_ids, pixel_values=None, image_grid_thw=None,
                         uniform: bool = False) -> tuple[torch.Tensor, VisualContext]:
        """``embed_inputs`` and the ``VisualContext`` the decoder needs for this sequence (pass it to ``forward``)."""
        embeds = self.embed_tokens(input_ids)
        image_mask = input_ids == self.image_token_id
        n_slots = int(image_mask.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"the batch has {n_slots} image tokens but no pixel_values")
            if uniform:
                features, deepstack = self.image_inputs_for_lm(*self.dummy_image_inputs())
                dummy = sum(t.sum() for t in (*features, *deepstack))
                embeds = embeds + 0.0 * dummy.to(embeds.dtype)
            return embeds, VisualContext(image_mask)
        features, deepstack = self.image_inputs_for_lm(pixel_values, image_grid_thw)
        features = torch.cat(features, dim=0)
        if features.shape[0] != n_slots:
            raise ValueError(
                f"image features and image tokens do not match: {n_slots} image tokens in input_ids, "
                f"{features.shape[0]} features from image_grid_thw={image_grid_thw.tolist()} "
                "(was a sequence truncated inside an image?)")
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds, VisualContext(image_mask, tuple(deepstack))


_BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator keyed by the HF ``model_type`` the adapter serves."""
    _BACKBONES[cls.family] = cls
    return cls


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def backbone_class(model_type: str) -> type[Backbone]:
    if model_type not in _BACKBONES:
        raise ValueError(f"no backbone adapter for model_type {model_type!r}; supported: {', '.join(list_backbones())}")
    return _BACKBONES[model_type]


def backbone_for_processor(processor) -> type[Backbone]:
    """The adapter class serving this HF processor (what the collator and the prompt encoder read formats from)."""
    for cls in _BACKBONES.values():
        if cls.processor_class is not None and isinstance(processor, cls.processor_class):
            return cls
    raise ValueError(f"no backbone adapter for the processor {type(processor).__name__}; supported families: "
                     f"{', '.join(list_backbones())}")
