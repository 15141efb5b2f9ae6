"""The ``text`` baseline: plain chain-of-thought or direct answers on the same pipeline, no latent tokens."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LatentMethod, MethodConfig, register_method


@dataclass
class TextConfig(MethodConfig):
    helper_images: str = "drop"  # where a record has a latent step: "drop" it, or show the helper "image" inline


@register_method
class TextMethod(LatentMethod):
    name = "text"
    config_class = TextConfig
    uses_latents = False

    def __init__(self, config: TextConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        if config.helper_images not in ("drop", "image"):
            raise ValueError(f"text method: helper_images must be 'drop' or 'image', got {config.helper_images!r}")

    def latent_mode(self) -> str:
        return self.config.helper_images

    def training_losses(self, model, batch):
        embeds = model.embed_inputs(batch)
        hidden = model.run_language_model(embeds, batch).last_hidden_state
        return {"ce": model.lm_loss(hidden, batch["labels"])}
