"""Backbone adapters: one per HF VLM family, behind the same small surface (see ``base.Backbone``)."""

from .base import Backbone, BackboneOutput, backbone_class, list_backbones, register_backbone
from .qwen2_5_vl import Qwen2_5_VLBackbone

__all__ = ["Backbone", "BackboneOutput", "Qwen2_5_VLBackbone", "backbone_class", "list_backbones", "register_backbone"]
