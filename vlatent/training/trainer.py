"""``LatentTrainer``: ``transformers.Trainer`` for a ``LatentVLM``, with the method's named losses logged one by one
and checkpoints written by ``LatentVLM.save_pretrained`` (also the consolidated weights under ZeRO-3)."""

from __future__ import annotations

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from .lora import merge_lora

FREEZE_SWITCHES = ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model")


def apply_freezing(model, freeze_vision_tower: bool = False, freeze_multi_modal_projector: bool = False,
                   freeze_language_model: bool = False) -> dict[str, int]:
    """Freeze the named backbone parts; returns trainable / frozen parameter counts."""
    parts = model.backbone.parts()
    for name, frozen in (("vision_tower", freeze_vision_tower), ("multi_modal_projector", freeze_multi_modal_projector),
                         ("language_model", freeze_language_model)):
        for module in parts[name]:
            module.requires_grad_(not frozen)
    counts = parameter_counts(model)
    if counts["trainable"] == 0:
        raise ValueError("every parameter is frozen: unset one of " + ", ".join(FREEZE_SWITCHES))
    return counts


def parameter_counts(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in model.parameters()) - trainable}


class LatentTrainer(Trainer):
    """Trains ``LatentVLM.forward(batch)``; logs ``loss_<name>`` for each of the method's named losses."""

    def __init__(self, *args, train_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler  # from ``method.training_data`` (e.g. perception's curriculum)
        self._named: dict[str, torch.Tensor] = {}
        self._named_since = 0

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler if self.train_sampler is not None else super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(inputs)
        scale = 1.0 / self.args.gradient_accumulation_steps
        for name, value in out.losses.items():
            value = value.detach().float() * scale
            self._named[name] = self._named.get(name, 0.0) + value
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._named:  # a training log: add the running means of the named losses
            steps = max(1, self.state.global_step - self._named_since)
            for name, total in sorted(self._named.items()):
                logs[f"loss_{name}"] = round(nested_gather(total.reshape(1), self.args.parallel_mode).mean().item() / steps, 4)
            self._named, self._named_since = {}, self.state.global_step
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if getattr(model, "lora", None) is not None:  # checkpoints stay plain HF: adapters merged in
            state_dict = merge_lora(model.state_dict() if state_dict is None else state_dict, model.lora.scaling)
        model.save_pretrained(output_dir or self.args.output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_deepspeed_enabled:  # the DeepSpeed engine restores its own partitioned states
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if getattr(model or self.model, "lora", None) is not None:
            raise ValueError(f"--resume of a LoRA run needs DeepSpeed: {resume_from_checkpoint!r} holds merged "
                             "weights, and only a DeepSpeed checkpoint keeps the adapters apart")
        (model or self.model).load_weights(resume_from_checkpoint)
