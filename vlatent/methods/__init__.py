"""Latent-reasoning methods, one file each, behind ``base.LatentMethod`` and the registry."""

from .base import LatentContext, LatentMethod, LatentTokens, MethodConfig, create_method, list_methods, method_class, register_method
from .cocova import Cocova, CocovaConfig
from .mirage import Mirage, MirageConfig
from .monet import Monet, MonetConfig
from .perception import Perception, PerceptionConfig
from .sketchpad import Sketchpad, SketchpadConfig
from .text import TextConfig, TextMethod

__all__ = ["Cocova", "CocovaConfig", "LatentContext", "LatentMethod", "LatentTokens", "MethodConfig", "Mirage", "MirageConfig", "Monet", "MonetConfig",
           "Perception", "PerceptionConfig", "Sketchpad", "SketchpadConfig", "TextConfig", "TextMethod", "create_method", "list_methods", "method_class", "register_method"]
