"""Qwen2.5-VL adapter: ViT + merger into LM space, M-RoPE (3-D) position ids, the text decoder over embeddings.

Latent slots are text tokens for the model's own rope index (``mm_token_type_ids == 0``), so every latent step
advances all three M-RoPE axes by one, exactly as a text token at that position would; except where a method's latents
stand for an image (Latent Sketchpad's sketches): ``image_positions`` gives them the rope index's image layout.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.vision_utils import get_vision_window_index

from .base import Backbone, ChatFormat, register_backbone


@register_backbone
class Qwen2_5_VLBackbone(Backbone):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor
    chat_format = ChatFormat("<|im_start|>", "<|im_end|>", "assistant", ("<|vision_start|>", "<|vision_end|>"))

    @property
    def vision_features_per_token(self) -> int:
        return self.config.vision_config.spatial_merge_size**2

    @classmethod
    def fixed_size_images_kwargs(cls, processor, size):
        return {"size": {"shortest_edge": size * size, "longest_edge": size * size}}  # pin the pixel area

    def encode_images(self, pixel_values, image_grid_thw):
        out = self.model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        return list(out.pooler_output)  # per image: (grid_h/2 * grid_w/2, hidden), raster order

    def token_grid(self, image_grid_thw, n_tokens):
        _, h, w = image_grid_thw.tolist()  # patches; each LM token merges an m x m block of them
        m = self.config.vision_config.spatial_merge_size
        return h // m, w // m

    def image_positions(self, image_grid_thw, n_tokens):
        rows, cols = self.token_grid(image_grid_thw, n_tokens)
        if rows * cols != n_tokens:
            raise ValueError(f"{self.family}: {n_tokens} image tokens, a {rows} x {cols} grid of them in "
                             f"image_grid_thw={image_grid_thw.tolist()}")
        h, w = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)  # raster order
        return torch.stack([torch.zeros_like(h), h, w])  # (3, n): t stays, h the token's row, w its column

    def vision_features(self, pixel_values, image_grid_thw):
        visual = self.model.model.visual
        v = self.config.vision_config
        out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw)
        # the ViT runs in window order, in runs of m*m patches; undo it as the model undoes it for merged tokens
        window_index, _ = get_vision_window_index(image_grid_thw, spatial_merge_size=v.spatial_merge_size,
                                                  window_size=v.window_size, patch_size=v.patch_size)
        unit = v.spatial_merge_size**2
        hidden = out.last_hidden_state  # (n_patches, vision_hidden), window order
        hidden = hidden.view(-1, unit, hidden.shape[-1])[torch.argsort(window_index)].flatten(0, 1)
        return list(hidden.split(image_grid_thw.prod(-1).tolist()))  # per image: (grid_h * grid_w, vision_hidden)

    def project_vision_features(self, features):
        merger = self.model.model.visual.merger
        return merger(features.type(merger.ln_q.weight.dtype))  # (n / 4, hidden)

    @property
    def vision_feature_norm(self):
        return self.model.model.visual.merger.ln_q

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

    def step_position_ids(self, next_pos):
        return next_pos.view(1, -1, 1).expand(3, -1, 1)  # (3, n, 1): a text token advances t, h and w alike
