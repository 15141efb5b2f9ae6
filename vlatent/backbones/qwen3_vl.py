"""Qwen3-VL adapter: Qwen2.5-VL's (ViT + merger, 3-D rope index, ChatML) plus DeepStack and interleaved M-RoPE.

DeepStack: the ViT's intermediate layers (``deepstack_visual_indexes``) go through their own mergers and are added to
the image tokens' hidden states after the first decoder layers. ``image_inputs_for_lm`` returns them with the image
embeddings, ``embed_multimodal`` keeps them in the ``VisualContext``, and ``forward`` hands the part of them that
falls inside its positions to the decoder (as ``Qwen3VLModel.forward`` does), so they reach the LM layers when the
sequence comes in as embeddings, in training (full, prefix or chunked passes) and in generation alike.

Interleaved M-RoPE: the rotary embedding of ``Qwen3VLTextModel`` interleaves the t/h/w frequencies itself; the
adapter gives it the model's own 3-D rope index. Latent slots are text tokens for it (``mm_token_type_ids == 0``),
so every latent step advances all three axes by one, as a text token at that position would; sketches take the image
layout of Qwen2.5-VL's ``image_positions`` (the same rope index for images).
"""

from __future__ import annotations

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from .base import BackboneOutput, register_backbone
from .qwen2_5_vl import Qwen2_5_VLBackbone


@register_backbone
class Qwen3VLBackbone(Qwen2_5_VLBackbone):
    family = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    processor_class = Qwen3VLProcessor

    def encode_images(self, pixel_values, image_grid_thw):
        return self.image_inputs_for_lm(pixel_values, image_grid_thw)[0]

    def image_inputs_for_lm(self, pixel_values, image_grid_thw):
        out = self.model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        # per image: (grid_h/2 * grid_w/2, hidden), raster order; DeepStack: per layer, all images' tokens in order
        return list(out.pooler_output), tuple(torch.cat(layer) for layer in out.deepstack_features)

    def vision_features(self, pixel_values, image_grid_thw):
        visual = self.model.model.visual
        hidden = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw).last_hidden_state
        # no window attention here: the processor's runs of m*m patches, which the merger fuses, are already in order
        return list(hidden.split(image_grid_thw.prod(-1).tolist()))  # per image: (grid_h * grid_w, vision_hidden)

    def project_vision_features(self, features):
        merger = self.model.model.visual.merger
        return merger(features.type(merger.linear_fc1.weight.dtype))  # (n / m^2, hidden)

    @property
    def vision_feature_norm(self):
        merger = self.model.model.visual.merger
        return None if merger.use_postshuffle_norm else merger.norm  # post-shuffle: a norm over fused tokens

    def parts(self):
        visual = self.model.model.visual
        return {"vision_tower": [visual.patch_embed, visual.pos_embed, visual.blocks],
                "multi_modal_projector": [visual.merger, visual.deepstack_merger_list],
                "language_model": [self.model.model.language_model, self.model.lm_head]}

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key_values=None, use_cache=False,
                output_hidden_states=False, visual=None) -> BackboneOutput:
        deepstack = {}
        if visual is not None and visual.deepstack:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            window = visual.window(start, inputs_embeds.shape[1])
            if window.image_mask.any():
                deepstack = {"visual_pos_masks": window.image_mask, "deepstack_visual_embeds": list(window.deepstack)}
        return self.run_decoder(inputs_embeds, position_ids, attention_mask, past_key_values, use_cache,
                                output_hidden_states, **deepstack)
