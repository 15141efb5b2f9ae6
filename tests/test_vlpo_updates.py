"""VLPO as released: z = mu in rollouts, several actor mini-batch updates per rollout batch (so the ratio leaves 1
and clipping acts), and the exploration noise stated against the measured latent norm."""

import copy
import math

import pytest
import torch
from transformers import TrainingArguments

from vlatent.data import load_records
from vlatent.model import LatentVLM
from vlatent.training import VLPOConfig, VLPOTrainer, register_reward
from vlatent.training.vlpo import action_log_probs

from test_vlpo import write_prompts


def make_trainer(model, tmp_path, n_records, lr=1e-3, max_steps=2, per_device=4, reward_funcs=("test_length",), **vlpo):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=per_device,
                             learning_rate=lr, max_steps=max_steps, report_to=[], use_cpu=True, save_strategy="no",
                             seed=0, disable_tqdm=True, logging_steps=1, lr_scheduler_type="constant")
    config = VLPOConfig(num_generations=4, max_completion_length=6, prefix="<|latent_start|>", latent_sigma=0.5,
                        reward_funcs=list(reward_funcs), **vlpo)
    records = load_records(write_prompts(tmp_path / "data", n_records))
    return VLPOTrainer(model=model, args=args, vlpo=config, train_dataset=records)


def test_release_defaults():
    c = VLPOConfig()
    # Monet RL: `sampled = mu  # + torch.randn_like(mu)`; 64 prompts per rollout / 16 per actor mini-batch
    assert c.latent_exploration is False and c.updates_per_rollout == 4 and c.off_policy


def test_mini_batch_updates_reuse_one_rollout_batch_and_clip(tiny_base, tmp_path):
    """Two updates per rollout batch at a learning rate that moves the policy far: the first update is on-policy
    (ratio 1, nothing clipped), the second scores the same rollouts under the moved policy against the log-probs of
    the policy that generated them, and the clip binds."""
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="mirage", num_latent_tokens=2)
    initial = copy.deepcopy(model).eval()
    trainer = make_trainer(model, tmp_path, n_records=2, lr=5e-2, updates_per_rollout=2)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [("reward" in e) for e in logs] == [True, False]  # generated once, at the first update
    assert logs[0]["clip_ratio/region_mean"] == 0
    assert logs[1]["clip_ratio/region_mean"] > 0, logs[1]

    # both mini-batches were generated before any update: their old log-probs are the initial policy's
    assert len(trainer._buffer) == 2
    first, second = trainer._buffer
    assert first.ids != second.ids
    with torch.no_grad():
        expected = action_log_probs(initial, second, 1.0, 0.5, True)
    mask = second.text_mask | second.latent_mask
    torch.testing.assert_close(second.old_log_probs[mask], expected[mask], atol=1e-3, rtol=1e-4)
    # z = mu (no exploration): each latent's Gaussian log-density is at its peak, -d log sigma - d/2 log 2 pi
    d = model.backbone.hidden_size
    peak = -d * math.log(0.5) - 0.5 * d * math.log(2 * math.pi)
    assert second.latent_mask.sum() == 8
    torch.testing.assert_close(second.old_log_probs[second.latent_mask], torch.full((8,), peak), atol=1e-2, rtol=0)


def test_exploration_noise_is_logged_against_the_latent_norm(tiny_base, tmp_path, caplog):
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="mirage", num_latent_tokens=2)
    d = model.backbone.hidden_size
    off = make_trainer(model, tmp_path, n_records=1, updates_per_rollout=1)
    rollouts = off.rollout(off.train_dataset[:1] * 4)
    # z = mu: the logged norm of the means is the norm of the latents fed
    z_norm = rollouts.latents.float().norm(dim=-1).mean().item()
    assert off._metrics["latents/mean_norm"][0] == pytest.approx(z_norm, rel=1e-3)
    assert "latents/noise_norm" not in off._metrics

    on = make_trainer(model, tmp_path, n_records=1, updates_per_rollout=1, latent_exploration=True)
    on.rollout(on.train_dataset[:1] * 4)
    assert on._metrics["latents/noise_norm"] == [pytest.approx(0.5 * math.sqrt(d))]
    assert any("x the measured norm of the latent means" in r.message for r in caplog.records)


@register_reward("test_batch_scale")
def _batch_scale(completions, id, **kwargs):
    """q0's group of 4: 1, 0, 0, 0; q1's: 3, 0, 3, 0 (the row's place in its group decides)."""
    return [{"q0": (1.0, 0, 0, 0), "q1": (3.0, 0, 3, 0)}[rid][i % 4] for i, rid in enumerate(id)]


def test_batch_scaled_advantages_use_the_whole_rollout_batchs_std(tiny_base, tmp_path):
    """``scale_rewards: batch`` over a rollout batch of two micro-batches (one group each): every advantage is its
    group-centred reward over the std of all 8 rewards, not of its own micro-batch's 4 (0.5 for q0's alone)."""
    import statistics

    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="mirage", num_latent_tokens=2)
    trainer = make_trainer(model, tmp_path, 2, scale_rewards="batch", updates_per_rollout=2,
                           reward_funcs=["test_batch_scale"])
    records = sorted(trainer.train_dataset, key=lambda r: r["id"])
    batch = trainer._rollout_batch([records[0]] * 4 + [records[1]] * 4, 0)
    std = statistics.stdev([1, 0, 0, 0, 3, 0, 3, 0])  # unbiased, as TRL
    expected = [[0.75, -0.25, -0.25, -0.25], [1.5, -1.5, 1.5, -1.5]]  # each group minus its mean
    assert len(batch) == 2
    for rollouts, centred in zip(batch, expected):
        torch.testing.assert_close(rollouts.advantages, torch.tensor(centred) / (std + 1e-4))
