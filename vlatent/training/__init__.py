"""SFT (and later RL) training of a ``LatentVLM`` on ``transformers.Trainer`` + DeepSpeed."""

from .plots import plot_losses
from .recipe import DataConfig, Recipe, load_deepspeed_config, load_recipe
from .trainer import FREEZE_SWITCHES, LatentTrainer, apply_freezing

__all__ = ["DataConfig", "FREEZE_SWITCHES", "LatentTrainer", "Recipe", "apply_freezing", "load_deepspeed_config",
           "load_recipe", "plot_losses"]
