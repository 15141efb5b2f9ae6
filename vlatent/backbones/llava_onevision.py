"""LLaVA-OneVision adapter: SigLIP + 2-layer MLP projector, AnyRes crops with newline tokens, 1-D positions, Qwen2.

Images travel as crops: ``pack_images`` drops the processor's zero padding and concatenates every image's crops
along dim 0, with one ``(num_crops, height, width)`` row per image (the original size, which the AnyRes unpadding
needs). An image alone in its sample gets the base view plus the AnyRes grid; an image of a multi-image sample gets
the base view only, exactly as the processor counts its tokens.

The vision feature space (``vision_features``) is the base view's SigLIP patches: the projector maps each patch to
one LM token, the first tokens of the image (the AnyRes crops and the learned newline tokens follow them).
"""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from .base import Backbone, ChatFormat, register_backbone, text_position_ids


@register_backbone
class LlavaOnevisionBackbone(Backbone):
    family = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    processor_class = LlavaOnevisionProcessor
    chat_format = ChatFormat("<|im_start|>", "<|im_end|>", "assistant")

    @property
    def vision_features_per_token(self) -> int:
        return 1  # the projector maps each patch to one LM token

    @classmethod
    def pack_images(cls, processor, outputs):
        pixel_values, sizes = outputs["pixel_values"], outputs["image_sizes"]  # (n, max_crops, 3, S, S), (n, 2)
        per_sample = outputs.get("batch_num_images")
        per_sample = [1] * len(sizes) if per_sample is None else [int(k) for k in per_sample]
        alone = [k == 1 for k in per_sample for _ in range(k)]  # only an image alone in its sample is cropped
        side = processor.image_processor.size["height"]
        pinpoints = processor.image_processor.image_grid_pinpoints
        crops = [image_size_to_num_patches(s.tolist(), pinpoints, side) if a else 1 for s, a in zip(sizes, alone)]
        flat = torch.cat([pv[:c] for pv, c in zip(pixel_values, crops)])  # (total_crops, 3, S, S)
        return flat, torch.cat([torch.tensor(crops)[:, None], sizes.long()], dim=1)  # (n, 3): crops, height, width

    def _patch_features(self, pixel_values) -> torch.Tensor:
        """SigLIP features of every crop at the configured layer(s): (crops, patches, vision_hidden * n_layers)."""
        tower = self.model.model.vision_tower
        out = tower(pixel_values.type(tower.dtype), output_hidden_states=True)
        layer = self.config.vision_feature_layer
        layers = [layer] if isinstance(layer, int) else layer
        features = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        return features[:, 1:] if self.config.vision_feature_select_strategy == "default" else features

    def encode_images(self, pixel_values, image_grid_thw):
        model = self.model.model
        crops = model.multi_modal_projector(self._patch_features(pixel_values))  # (total_crops, patches, hidden)
        per_image = list(crops.split(image_grid_thw[:, 0].tolist()))
        packed, _ = model.pack_image_features(per_image, image_grid_thw[:, 1:], image_newline=model.image_newline,
                                              vision_aspect_ratio=self.config.vision_aspect_ratio)
        return packed  # per image: (base patches [+ unpadded crop patches with a newline per row] + 1, hidden)

    def token_grid(self, image_grid_thw, n_tokens):
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return side, side  # the base view's patches come first; the AnyRes crops (and newlines) follow

    def vision_features(self, pixel_values, image_grid_thw):
        first = torch.cumsum(image_grid_thw[:, 0], 0) - image_grid_thw[:, 0]  # each image's base view
        return list(self._patch_features(pixel_values[first]))  # per image: (patches, vision_hidden)

    def project_vision_features(self, features):
        projector = self.model.model.multi_modal_projector
        return projector(features.type(projector.linear_1.weight.dtype))  # (n, hidden)

    def parts(self):
        model = self.model.model
        return {"vision_tower": [model.vision_tower],
                "multi_modal_projector": [model.multi_modal_projector, model.image_newline],
                "language_model": [model.language_model, self.model.lm_head]}

    def dummy_image_inputs(self):
        side = self.config.vision_config.image_size
        param = next(self.model.model.vision_tower.parameters())
        grid = torch.tensor([[1, side, side]], device=param.device)  # one crop: the base view only
        return torch.zeros(1, 3, side, side, device=param.device, dtype=param.dtype), grid

    def position_ids(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask):
        return text_position_ids(attention_mask)  # (batch, seq)
