"""What ``LatentVLM`` needs from a VLM family, and the registry keyed by the HF ``model_type``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput


@dataclass
class BackboneOutput(ModelOutput):
    """Language-model pass over ``inputs_embeds``."""

    last_hidden_state: torch.Tensor | None = None  # (batch, seq, hidden), after the final norm
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, when asked for


class Backbone(nn.Module):
    """Adapter over one HF VLM. Subclasses wrap the model as ``self.model`` and implement the hooks."""

    family: str = ""
    model_class: type | None = None

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) -> (batch, seq, hidden)."""
        return self.model.get_input_embeddings()(input_ids)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Vision tower + projector into LM space, one ``(n_tokens_i, hidden)`` tensor per image."""
        raise NotImplementedError

    def position_ids(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
        """Position ids for a padded batch as the model itself computes them."""
        raise NotImplementedError

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key_values=None, use_cache=False,
                output_hidden_states=False) -> BackboneOutput:
        raise NotImplementedError

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
        embeds = self.embed_tokens(input_ids)
        image_mask = input_ids == self.image_token_id
        n_slots = int(image_mask.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"the batch has {n_slots} image tokens but no pixel_values")
            if uniform:
                dummy = torch.cat(self.encode_images(*self.dummy_image_inputs()))
                embeds = embeds + 0.0 * dummy.sum().to(embeds.dtype)
            return embeds
        features = torch.cat(self.encode_images(pixel_values, image_grid_thw), dim=0)
        if features.shape[0] != n_slots:
            raise ValueError(
                f"image features and image tokens do not match: {n_slots} image tokens in input_ids, "
                f"{features.shape[0]} features from image_grid_thw={image_grid_thw.tolist()} "
                "(was a sequence truncated inside an image?)")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))


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
