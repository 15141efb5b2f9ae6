"""Gemma 3 adapter: SigLIP + average pooling + the soft-embedding projector, 1-D positions, bidirectional image
attention, the Gemma 3 decoder (sliding / full attention layers).

Each image is a fixed square (``image_size``; pan-and-scan crops are images of their own): its ``(p x p)`` SigLIP
patches are average-pooled ``k x k`` into ``mm_tokens_per_image`` soft tokens, RMS-normed and projected. The tokens
of one image attend to each other both ways (``token_type_ids`` in HF): ``forward`` builds that mask from the
``VisualContext`` whenever image tokens are among its queries (whole sequences, the generation prefill, chunked
passes over a cache) and opens the same blocks in a method's own additive 4-D mask; decode steps are causal, as in HF.
"""

from __future__ import annotations

import torch
from transformers import Gemma3ForConditionalGeneration, Gemma3Processor
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from .base import CACHE, Backbone, BackboneOutput, ChatFormat, register_backbone, text_position_ids


@register_backbone
class Gemma3Backbone(Backbone):
    family = "gemma3"
    model_class = Gemma3ForConditionalGeneration
    processor_class = Gemma3Processor
    chat_format = ChatFormat("<start_of_turn>", "<end_of_turn>", "model", ("<start_of_image>", "<end_of_image>"))

    @property
    def _pool(self) -> tuple[int, int]:
        """(tokens per side, pooling kernel): 16 and 4 for the released models (64 x 64 patches -> 256 tokens)."""
        projector = self.model.model.multi_modal_projector
        return projector.tokens_per_side, projector.kernel_size

    @property
    def vision_features_per_token(self) -> int:
        return self._pool[1] ** 2

    @classmethod
    def pack_images(cls, processor, outputs):
        pixel_values = outputs["pixel_values"]  # (n, 3, S, S), already one entry per image or crop
        n, _, height, width = pixel_values.shape
        return pixel_values, torch.tensor([[1, height, width]]).expand(n, 3).clone()  # (n, 3): 1, height, width

    def encode_images(self, pixel_values, image_grid_thw):
        out = self.model.model.get_image_features(pixel_values.type(self.model.model.vision_tower.dtype))
        return list(out.pooler_output)  # per image: (mm_tokens_per_image, hidden), raster order

    def vision_features(self, pixel_values, image_grid_thw):
        tower = self.model.model.vision_tower
        hidden = tower(pixel_values=pixel_values.type(tower.dtype)).last_hidden_state  # (n, p * p, vision_hidden)
        t, k = self._pool
        # runs of k * k patches, one run per pooled token, tokens in raster order
        runs = hidden.view(hidden.shape[0], t, k, t, k, -1).permute(0, 1, 3, 2, 4, 5)
        return list(runs.reshape(hidden.shape[0], t * t * k * k, -1))  # per image: (p * p, vision_hidden)

    def project_vision_features(self, features):
        projector = self.model.model.multi_modal_projector
        pooled = features.view(-1, self._pool[1] ** 2, features.shape[-1]).mean(1)  # = the k x k average pool
        normed = projector.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, projector.mm_input_projection_weight).type_as(features)  # (n / k^2, hidden)

    def parts(self):
        model = self.model.model
        return {"vision_tower": [model.vision_tower],
                "multi_modal_projector": [model.multi_modal_projector],
                "language_model": [model.language_model, self.model.lm_head]}

    def dummy_image_inputs(self):
        side = self.config.vision_config.image_size
        param = next(self.model.model.vision_tower.parameters())
        grid = torch.tensor([[1, side, side]], device=param.device)
        return torch.zeros(1, 3, side, side, device=param.device, dtype=param.dtype), grid

    def position_ids(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask):
        return text_position_ids(attention_mask)  # (batch, seq)

    def _image_attention(self, inputs_embeds, position_ids, attention_mask, past_key_values, visual):
        """The decoder's attention mask with each image's tokens attending to each other both ways (for the queries of
        this pass, positions ``[start, start + length)`` after ``start`` cached ones; an image never spans passes)."""
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        length = inputs_embeds.shape[1]
        if visual is None or not bool(visual.window(start, length).image_mask.any()):
            return attention_mask  # no image token among the queries: causal as it is
        blocks = get_block_sequence_ids_for_mask(visual.window(0, start + length).image_mask.long())  # (batch, kv)
        if attention_mask.dim() == 4:  # a method's additive mask: open each image block, change nothing else
            queries = blocks[:, start:]
            same = (queries[:, :, None] == blocks[:, None, :]) & (queries[:, :, None] >= 0)  # (batch, q, kv)
            return attention_mask.masked_fill(same[:, None], 0.0)
        return create_masks_for_vision_model(
            config=self.config.text_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            position_ids=position_ids, block_sequence_ids=blocks, **{CACHE: past_key_values})

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key_values=None, use_cache=False,
                output_hidden_states=False, visual=None) -> BackboneOutput:
        mask = self._image_attention(inputs_embeds, position_ids, attention_mask, past_key_values, visual)
        return self.run_decoder(inputs_embeds, position_ids, mask, past_key_values, use_cache, output_hidden_states)
