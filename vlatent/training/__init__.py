"""SFT and RL (VLPO) training of a ``LatentVLM`` on ``transformers.Trainer`` + DeepSpeed."""

from .lora import LoraSettings, apply_lora, merge_lora
from .plots import plot_losses
from .recipe import DataConfig, Recipe, load_deepspeed_config, load_recipe
from .trainer import FREEZE_SWITCHES, LatentTrainer, apply_freezing, parameter_counts
from .rewards import get_reward, list_rewards, register_reward
from .vlpo import VLPOConfig, VLPOTrainer

__all__ = ["DataConfig", "FREEZE_SWITCHES", "LatentTrainer", "LoraSettings", "Recipe", "apply_freezing", "apply_lora",
           "load_deepspeed_config", "load_recipe", "merge_lora", "parameter_counts", "plot_losses",
           "VLPOConfig", "VLPOTrainer", "get_reward", "list_rewards", "register_reward"]
