"""Monet's online difficulty filter in VLPO: which groups survive (hand-made correctness), the recipe checks, and one
tiny VLPO step with the filter on."""

import pytest
import torch
from transformers import TrainingArguments

from vlatent.data import load_records
from vlatent.model import LatentVLM
from vlatent.training import VLPOConfig, VLPOTrainer, register_reward
from vlatent.training.vlpo import action_mask, difficulty_keep

from test_vlpo import write_prompts


def test_groups_kept_when_some_but_at_most_the_threshold_are_right():
    correct = torch.tensor([1, 1, 1, 1,  # 1.0: too easy, dropped
                            0, 0, 0, 0,  # 0.0: no right answer, dropped
                            1, 0, 0, 0,  # 0.25: kept
                            1, 0, 1, 0,  # 0.5: kept
                            1, 1, 1, 0],  # 0.75: dropped
                           dtype=torch.float)
    assert difficulty_keep(correct, 4, 0.6).tolist() == [False, False, True, True, False]
    # the boundary is kept (the release drops only acc > threshold); partial rewards, -1 and nan are not "correct"
    assert difficulty_keep(torch.tensor([1.0, 1, 1, 0, 0]), 5, 0.6).tolist() == [True]
    assert difficulty_keep(torch.tensor([0.5, -1, float("nan"), 0]), 4, 0.6).tolist() == [False]
    assert difficulty_keep(torch.tensor([1.0, 1, 0.5, 0]), 4, 0.6).tolist() == [True]


def test_filter_keys_are_checked():
    assert not VLPOConfig().difficulty_filter and VLPOConfig().difficulty_threshold == 0.6
    with pytest.raises(ValueError, match="difficulty_threshold must be in"):
        VLPOConfig(difficulty_threshold=1.5).validate()
    with pytest.raises(ValueError, match="difficulty_reward 'format' must be one of reward_funcs"):
        VLPOConfig(difficulty_filter=True, difficulty_reward="format").validate()


@register_reward("test_q0_quarter")
def _q0_quarter(completions, id, **kwargs):
    """q0: the first rollout of each group of 4 right (share 0.25); q1: all right (share 1.0)."""
    return [1.0 if rid == "q1" or (rid == "q0" and i % 4 == 0) else 0.0 for i, rid in enumerate(id)]


def test_one_vlpo_step_with_the_filter_drops_the_easy_group(tiny_base, tmp_path):
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="mirage", num_latent_tokens=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-3,
                             max_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                             logging_steps=1, lr_scheduler_type="constant")
    config = VLPOConfig(num_generations=4, max_completion_length=6, prefix="<|latent_start|>", latent_sigma=0.5,
                        updates_per_rollout=1, reward_funcs=["test_length", "test_q0_quarter"],
                        difficulty_filter=True, difficulty_reward="test_q0_quarter")  # not the first reward
    trainer = VLPOTrainer(model=model, args=args, vlpo=config,
                          train_dataset=load_records(write_prompts(tmp_path / "data", 2)))
    records = sorted(trainer.train_dataset, key=lambda r: r["id"])
    r = trainer.rollout([records[0]] * 4 + [records[1]] * 4)
    assert r.kept.tolist() == [True] * 4 + [False] * 4
    mask = action_mask(r, True)
    assert mask[:4].any() and not mask[4:].any() and r.normalizer == float(mask.sum())
    assert trainer._metrics["difficulty/groups_dropped"] == [1.0]
    assert trainer._metrics["difficulty/groups_kept"] == [1.0]

    trainer._metrics.clear()
    trainer.train()  # one optimizer step with the filter on, through the Trainer
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 1 and logs[0]["difficulty/groups_dropped"] == 1.0 and logs[0]["difficulty/groups_kept"] == 1.0
