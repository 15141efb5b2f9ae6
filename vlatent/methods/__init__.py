"""Latent-reasoning methods, one file each, behind ``base.LatentMethod`` and the registry."""

from .base import LatentContext, LatentMethod, LatentTokens, MethodConfig, create_method, list_methods, method_class, register_method
from .mirage import Mirage, MirageConfig
from .monet import Monet, MonetConfig
from .text import TextConfig, TextMethod

__all__ = ["LatentContext", "LatentMethod", "LatentTokens", "MethodConfig", "Mirage", "MirageConfig", "Monet", "MonetConfig",
           "TextConfig", "TextMethod", "create_method", "list_methods", "method_class", "register_method"]
