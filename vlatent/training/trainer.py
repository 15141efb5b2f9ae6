"""``LatentTrainer``: ``transformers.Trainer`` for a ``LatentVLM``, with the method's named losses logged one by one
and checkpoints written by ``LatentVLM.save_pretrained`` (also the consolidated weights under ZeRO-3).

Checkpoints are written into a staging folder and renamed to ``checkpoint-N`` only when complete, with a manifest
of their files' hashes that ``--resume`` verifies (``verify_checkpoint``); training stops on a non-finite loss,
gradient norm or weight (``NonFiniteError``) before anything non-finite is saved."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .lora import merge_lora, row_masked

MANIFEST = "vlatent_manifest.json"  # written last: a checkpoint without it is incomplete
STAGING = ".checkpoint-staging"  # checkpoints are written here, then renamed into the run folder
GENERATORS = "vlatent_rng_{}.pt"  # per process: the states of ``LatentTrainer.generators``


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight: the run stops before saving it."""


class CheckpointError(ValueError):
    """A checkpoint that ``--resume`` must not load: incomplete, altered, or from another recipe."""


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the manifest, by path relative to it."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return hashes


def write_manifest(folder: Path, run: dict) -> None:
    """Record the checkpoint's file hashes and the run it belongs to (recipe, world size)."""
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({**run, "files": file_hashes(folder)}, indent=1, default=str))
    os.replace(tmp, folder / MANIFEST)


def verify_checkpoint(folder: Path) -> dict:
    """The manifest of ``folder`` once every file matches it (no file missing, altered or added); else
    ``CheckpointError`` naming the file. Nothing in the folder is unpickled before this passes."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{str(folder)!r} has no readable {MANIFEST} ({e}): it is incomplete or was not "
                              "written by vlatent; delete it to resume from an earlier checkpoint") from None
    actual = file_hashes(folder)
    for name in sorted(set(expected) | set(actual)):
        problem = ("is missing" if name not in actual else "is not in the manifest" if name not in expected
                   else "does not match its hash" if actual[name] != expected[name] else None)
        if problem:
            raise CheckpointError(f"checkpoint {str(folder)!r}: {name} {problem}; refusing to load it (delete the "
                                  "checkpoint to resume from an earlier one)")
    return manifest


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters (this process's ZeRO-3 shard when partitioned) holding a NaN or an infinity."""
    return [n for n, p in model.named_parameters() if not torch.isfinite(getattr(p, "ds_tensor", p.data)).all()]

FREEZE_SWITCHES = ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model",
                   "freeze_embed_tokens", "freeze_projector_norm")


def apply_freezing(model, freeze_vision_tower: bool = False, freeze_multi_modal_projector: bool = False,
                   freeze_language_model: bool = False, freeze_embed_tokens: bool = False,
                   freeze_projector_norm: bool = False) -> dict[str, int]:
    """Freeze the named backbone parts; returns trainable / frozen parameter counts. ``freeze_embed_tokens`` and
    ``freeze_projector_norm`` narrow a trainable language model / projector (Latent Sketchpad's stage 1 as released)."""
    parts = model.backbone.parts()
    for name, frozen in (("vision_tower", freeze_vision_tower), ("multi_modal_projector", freeze_multi_modal_projector),
                         ("language_model", freeze_language_model)):
        for module in parts[name]:
            module.requires_grad_(not frozen)
    if freeze_projector_norm:
        norms = projector_norms(model)
        if not norms:
            raise ValueError(f"freeze_projector_norm: the {model.backbone.family} projector has no normalisation "
                             "layer to freeze (unset it)")
        for norm in norms:
            norm.requires_grad_(False)
    if freeze_embed_tokens:
        freeze_base_embeddings(model)
    counts = parameter_counts(model)
    if counts["trainable"] == 0:
        raise ValueError("every parameter is frozen: unset one of " + ", ".join(FREEZE_SWITCHES))
    return counts


def projector_norms(model) -> list[torch.nn.Module]:
    """The normalisation layers inside the projector / merger (Qwen2.5-VL: ``merger.ln_q``): freezing them leaves only
    its MLP trainable, as Latent Sketchpad's ``--unfreeze-connector`` trains ``visual.merger.mlp``."""
    return [m for part in model.backbone.parts()["multi_modal_projector"] for m in part.modules()
            if type(m).__name__.endswith("Norm")]


def freeze_base_embeddings(model) -> None:
    """Freeze the input embedding rows of the base vocabulary; the rows of the method's added tokens keep learning
    (they start at the mean row, where the release reuses the base's trained ``<|vision_start|>`` / ``_end|>``)."""
    from .lora import train_new_token_rows

    hf = model.backbone.model
    weight, head = hf.get_input_embeddings().weight, hf.get_output_embeddings()
    if not weight.requires_grad:  # the language model is frozen already
        return
    if head is not None and head.weight is weight and head.weight.requires_grad:
        raise ValueError("freeze_embed_tokens: this backbone ties its LM head to embed_tokens (tie_word_embeddings), "
                         "so freezing one would freeze the other; untie them or unset freeze_embed_tokens")
    weight.requires_grad_(False)
    train_new_token_rows(model)


def parameter_counts(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in model.parameters()) - trainable}


class LatentTrainer(Trainer):
    """Trains ``LatentVLM.forward(batch)``; logs ``loss_<name>`` for each of the method's named losses."""

    def __init__(self, *args, train_sampler=None, projector_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler  # from ``method.training_data`` (e.g. perception's curriculum)
        self.projector_lr = projector_lr  # the projector's own learning rate (recipe multi_modal_projector_lr)
        self.run_info: dict = {}  # written into each checkpoint's manifest (train/sft.py: recipe, world size)
        self._staging = False
        self._named: dict[str, torch.Tensor] = {}
        self._named_since = 0

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the projector's parameters (found by identity) moved into param groups of
        their own at ``projector_lr`` (Aurora's ``mm_projector_lr``: the projector at 2e-5 beside LoRA at 2e-4)."""
        optimizer = super().create_optimizer(model)
        if self.projector_lr is None:
            return optimizer
        latent_vlm = self.accelerator.unwrap_model(self.model if model is None else model)
        projector = {id(p) for m in latent_vlm.backbone.parts()["multi_modal_projector"] for p in m.parameters()}
        groups = []
        for group in optimizer.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            groups.append({**options, "params": [p for p in group["params"] if id(p) not in projector]})
            groups.append({**options, "params": [p for p in group["params"] if id(p) in projector],
                           "lr": self.projector_lr})
        optimizer.param_groups[:] = [g for g in groups if g["params"]]
        return optimizer

    def get_decay_parameter_names(self, model) -> list[str]:
        """The Trainer's, less the embedding matrices whose gradient is masked to the added tokens' rows
        (``freeze_embed_tokens``, LoRA without ``train_embeddings``): decay would move their frozen rows."""
        masked = {n for n, p in model.named_parameters() if row_masked(p)}
        return [n for n in super().get_decay_parameter_names(model) if n not in masked]

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler if self.train_sampler is not None else super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(inputs)
        scale = 1.0 / self.args.gradient_accumulation_steps
        for name, value in out.losses.items():
            value = value.detach().float() * scale
            self._named[name] = self._named.get(name, 0.0) + value
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The eval loss of a batch (``eval_loss``); a LatentVLM takes the collated batch whole and has no logits to
        compare, so evaluation during training is the loss on ``data.eval``."""
        latent_vlm = self.accelerator.unwrap_model(model)
        latent_vlm.lockstep = True  # every rank evaluates the same number of batches: keep ZeRO-3's gathers aligned
        try:
            with torch.no_grad():
                loss = model(self._prepare_inputs(inputs)).loss
        finally:
            latent_vlm.lockstep = False
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._stop(f"the loss is {loss.float().mean().item()}")
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        finite = grad_norm is None or torch.isfinite(torch.as_tensor(grad_norm)).all()
        if not finite and not self.args.fp16:  # fp16's loss scaler skips overflowing steps by itself
            self._stop(f"the gradient norm is {float(grad_norm)}")
        return grad_norm

    def _stop(self, what: str):
        """Raise ``NonFiniteError`` for the step in progress, naming the last complete checkpoint."""
        step = self.state.global_step + 1
        last = last_checkpoint(Path(self.args.output_dir))
        raise NonFiniteError(f"training stopped at step {step}: {what} (learning_rate={self.args.learning_rate}); "
                             "the final model was not saved, "
                             + (f"the last good checkpoint is {last}" if last else "no checkpoint was saved"))

    def generators(self) -> dict[str, torch.Generator]:
        """The run's random generators besides the global ones the Trainer checkpoints itself (``rng_state*.pth``):
        the method's (``LatentMethod.generators``); ``VLPOTrainer`` adds its rollout sampler. Each checkpoint keeps
        their states, so a resumed run draws what the uninterrupted run draws."""
        return self.accelerator.unwrap_model(self.model).method.generators()

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        states = {name: g.get_state() for name, g in self.generators().items()}
        if states:
            torch.save(states, os.path.join(output_dir, GENERATORS.format(self.args.process_index)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        generators = self.generators()
        if checkpoint is None or not generators:
            return
        path = Path(checkpoint, GENERATORS.format(self.args.process_index))
        saved = torch.load(path, weights_only=True) if path.is_file() else {}
        for name, g in generators.items():
            if name in saved:
                g.set_state(saved[name])
            else:  # a checkpoint of an older version, or of a run without this generator
                print(f"{checkpoint}: no state of the {name!r} generator: it restarts from its seed, so the resumed "
                      "run's draws differ from an uninterrupted run's")

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` into the staging folder, hash it, then rename it into the run folder."""
        bad = nonfinite_parameters(self.model)
        if bad:
            self._stop(f"{len(bad)} weight(s) are not finite, e.g. {bad[0]}; checkpoint not written")
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:  # leftovers of an interrupted save must not enter this one's manifest
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk
        if self.args.should_save:
            staged, final = run_dir / STAGING / name, run_dir / name
            write_manifest(staged, self.run_info)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
            if self.state.best_global_step:
                best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
                self.state.best_model_checkpoint = str(best) if best.exists() else None
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._named:  # a training log: add the running means of the named losses
            since = max(self._named_since, getattr(self, "_initial_global_step", 0))  # a resumed run starts there
            steps = max(1, self.state.global_step - since)
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

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the Trainer's own loader would match no key of a LatentVLM (strict=False)."""
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        if getattr(self.model, "lora", None) is not None:  # merged weights cannot go back into separate adapters
            print(f"load_best_model_at_end: {self.state.best_model_checkpoint} holds merged LoRA weights, which only "
                  "DeepSpeed can reload; keeping the last weights")
            return
        self.model.load_weights(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_deepspeed_enabled:  # the DeepSpeed engine restores its own partitioned states
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if getattr(model or self.model, "lora", None) is not None:
            raise ValueError(f"--resume of a LoRA run needs DeepSpeed: {resume_from_checkpoint!r} holds merged "
                             "weights, and only a DeepSpeed checkpoint keeps the adapters apart")
        (model or self.model).load_weights(resume_from_checkpoint)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The highest-numbered ``checkpoint-N`` of ``run_dir`` that has a manifest (complete), if any."""
    done = [p for p in checkpoints(run_dir) if (p / MANIFEST).is_file()]
    return done[-1] if done else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``run_dir``, complete or not, by step."""
    found = [p for p in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))
