"""LoRA through ``peft`` on the language model's linear layers. Checkpoints merge the adapters back into the base
weights, so a LoRA run saves the same plain HF checkpoint a full fine-tune does."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..configs import from_dict

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """The recipe's ``lora:`` block (peft's ``LoraConfig`` names)."""

    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # True: the whole embed_tokens and lm_head train beside the adapters (Aurora's release); False: only the rows of
    # the method's added tokens in embed_tokens (the LM head keeps what the freezing switches said)
    train_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict, where: str = "lora") -> "LoraSettings":
        s = from_dict(cls, d, where)
        if s.r < 1 or s.lora_alpha <= 0 or not 0 <= s.lora_dropout < 1 or not s.target_modules:
            raise ValueError(f"{where}: need r >= 1, lora_alpha > 0, 0 <= lora_dropout < 1 and target_modules, got {s}")
        return s

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def apply_lora(model, settings: LoraSettings) -> int:
    """Inject LoRA adapters into the language model and freeze its base weights, except the embedding rows of the
    method's new tokens (``train_embeddings``: all of ``embed_tokens`` and the LM head); returns the adapted layer
    count. The vision tower, projector, LM head and the method's modules keep whatever the freezing switches said."""
    from peft import LoraConfig, inject_adapter_in_model

    lm = model.backbone.parts()["language_model"][0]  # the decoder stack (the LM head stays as it is)
    names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    if missing := sorted(set(settings.target_modules) - names):
        raise ValueError(f"lora.target_modules {missing} name no linear layer of the language model; "
                         f"its linear layers are {sorted(names)}")
    lm.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                                       target_modules=settings.target_modules), lm)
    if settings.train_embeddings:  # after the injection, which leaves only the adapters trainable inside ``lm``
        model.backbone.model.get_input_embeddings().weight.requires_grad_(True)
        model.backbone.model.get_output_embeddings().weight.requires_grad_(True)
    else:
        train_new_token_rows(model)
    model.lora = settings
    return sum(1 for n, _ in lm.named_modules() if n.endswith(".lora_A"))


def train_new_token_rows(model) -> None:
    """Keep learning the input embeddings of the tokens the method added (latent delimiters, perception codes): the
    embedding matrix stays trainable with its gradient masked to those rows, so every other row stays as loaded
    (``row_masked``: no weight decay for it either, see ``LatentTrainer.get_decay_parameter_names``)."""
    ids = [model.tokenizer.convert_tokens_to_ids(t) for t in model.method.special_tokens()]
    if not ids:
        return
    weight = model.backbone.model.get_input_embeddings().weight
    keep = torch.zeros(weight.shape[0], 1, device=weight.device)
    keep[ids] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
    weight.vlatent_trained_rows = ids


def row_masked(param) -> bool:
    """Whether ``train_new_token_rows`` masked this parameter's gradient to some of its rows: AdamW's decoupled weight
    decay would still shrink the others, which a zero gradient otherwise leaves bit-identical."""
    return getattr(param, "vlatent_trained_rows", None) is not None


def merge_lora(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """``W + scaling * B @ A`` under the original key names; adapter keys are dropped. Works on any full state
    dict, including the consolidated one ZeRO-3 hands to ``save_model``."""
    merged = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, param = key.split(".base_layer.")
            if param == "weight":
                a, b = state_dict[f"{prefix}.lora_A.default.weight"], state_dict[f"{prefix}.lora_B.default.weight"]
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
            key = f"{prefix}.{param}"
        merged[key] = value
    return merged
