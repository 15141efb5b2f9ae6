"""Decoders: latents / codes -> something a person can look at. A decoder is a directory whose
``decoder_config.json`` names its ``"type"``; ``load_decoder(path)`` opens any of them."""

from __future__ import annotations

import json
from pathlib import Path

from .depth import DepthTokenizer
from .inspect import LatentInspection, PatchFeatures, image_patch_features, inspect_latents
from .sketch import SketchDecoder, SketchDecoderConfig, load_vision_encoder

# "type" in decoder_config.json -> class with from_pretrained(path)
DECODER_TYPES = {"depth_vq": DepthTokenizer, "sketch": SketchDecoder}


def load_decoder(path):
    """Open the decoder saved in ``path`` (a directory with ``decoder_config.json``), whatever its type."""
    config = Path(path) / "decoder_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a decoder directory: it has no decoder_config.json")
    kind = json.loads(config.read_text()).get("type")
    if kind not in DECODER_TYPES:
        raise ValueError(f"{str(config)!r}: unknown decoder type {kind!r}; known: {', '.join(sorted(DECODER_TYPES))}")
    return DECODER_TYPES[kind].from_pretrained(path)


__all__ = ["DECODER_TYPES", "DepthTokenizer", "LatentInspection", "PatchFeatures", "SketchDecoder",
           "SketchDecoderConfig", "image_patch_features", "inspect_latents", "load_decoder", "load_vision_encoder"]
