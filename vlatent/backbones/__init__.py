"""Backbone adapters: one per HF VLM family, behind the same small surface (see ``base.Backbone``)."""

from .base import (Backbone, BackboneOutput, ChatFormat, VisualContext, backbone_class, backbone_for_processor,
                   list_backbones, register_backbone)
from .gemma3 import Gemma3Backbone
from .llava_onevision import LlavaOnevisionBackbone
from .qwen2_5_vl import Qwen2_5_VLBackbone
from .qwen3_vl import Qwen3VLBackbone

__all__ = ["Backbone", "BackboneOutput", "ChatFormat", "Gemma3Backbone", "LlavaOnevisionBackbone", "Qwen2_5_VLBackbone",
           "Qwen3VLBackbone", "VisualContext", "backbone_class", "backbone_for_processor", "list_backbones",
           "register_backbone"]
