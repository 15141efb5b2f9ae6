"""Qwen2.5-VL adapter: ViT + merger into LM space, M-RoPE (3-D) position ids, the text decoder over embeddings.

Latent slots are text tokens for the model's own rope index (``mm_token_type_ids == 0``), so every latent step
advances all three M-RoPE axes by one, exactly as a text token at that position would.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from .base import Backbone, BackboneOutput, register_backbone


@register_backbone
class Qwen2_5_VLBackbone(Backbone):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def vision_feature_size(self) -> int:
        """Width of the ViT output before the merger (1280 for the 7B model)."""
        return self.config.vision_config.hidden_size

    def encode_images(self, pixel_values, image_grid_thw):
        out = self.model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        return list(out.pooler_output)  # per image: (grid_h/2 * grid_w/2, hidden), raster order

    def parts(self):
        visual = self.model.model.visual
        return {"vision_tower": [visual.patch_embed, visual.blocks],
                "multi_modal_projector": [visual.merger],
                "language_model": [self.model.model.language_model, self.model.lm_head]}

    def dummy_image_inputs(self):
        v = self.config.vision_config
        m = v.spatial_merge_size  # an m x m patch grid merges into one token
        width = v.in_channels * v.temporal_patch_size * v.patch_size**2
        param = next(self.model.model.visual.parameters())
        grid = torch.tensor([[1, m, m]], device=param.device)
        return torch.zeros(m * m, width, device=param.device, dtype=param.dtype), grid

    def position_ids(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask):
        # (3, batch, seq); padded positions are 0 and masked out anyway
        positions, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask)
        return positions

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key_values=None, use_cache=False,
                output_hidden_states=False) -> BackboneOutput:
        out = self.model.model.language_model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=past_key_values, use_cache=use_cache, output_hidden_states=output_hidden_states)
        return BackboneOutput(last_hidden_state=out.last_hidden_state, past_key_values=out.past_key_values,
                              hidden_states=out.hidden_states if output_hidden_states else None)
