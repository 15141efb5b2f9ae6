"""Monet's online difficulty filter in VLPO: which groups survive (hand-made correctness), the recipe checks, one
tiny VLPO step with the filter on, and the difficulty pool that refills a rollout batch with kept groups."""

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
    assert VLPOConfig().difficulty_pool == 1
    with pytest.raises(ValueError, match="difficulty_pool must be a positive integer, got 0"):
        VLPOConfig(difficulty_filter=True, difficulty_pool=0).validate()
    with pytest.raises(ValueError, match="difficulty_pool=4 refills .* set difficulty_filter: true"):
        VLPOConfig(difficulty_pool=4).validate()


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


def one_in_four_right_for(keep: set):
    """A reward whose groups of 4 for the prompts in ``keep`` have one right rollout (kept), all right elsewhere."""
    return lambda completions, id, **kwargs: [1.0 if rid not in keep or i % 4 == 0 else 0.0 for i, rid in enumerate(id)]


KEEP = {"q2", "q5", "q7"}
register_reward("test_pool_three")(one_in_four_right_for(KEEP))
register_reward("test_pool_one")(one_in_four_right_for({"q5"}))


def pool_trainer(tiny_base, tmp_path, reward):
    """One prompt (a group of 4) per micro-batch, 2 micro-batches per rollout batch, a pool of 4 x 2 prompts."""
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="mirage", num_latent_tokens=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3,
                             max_steps=2, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                             disable_tqdm=True, logging_steps=1, lr_scheduler_type="constant")
    config = VLPOConfig(num_generations=4, max_completion_length=4, prefix="<|latent_start|>", latent_sigma=0.5,
                        updates_per_rollout=2, reward_funcs=[reward], difficulty_filter=True, difficulty_pool=4)
    return VLPOTrainer(model=model, args=args, vlpo=config,
                       train_dataset=load_records(write_prompts(tmp_path / "data", 8)))


def pool_order(loader: list[str], n: int) -> list[str]:
    """The ids of the ``n`` other prompts the pool draws at global step 0 (seed 0, one process): a seeded permutation
    of q0..q7 without the loader's."""
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    return [f"q{i}" for i in order if f"q{i}" not in loader][:n]


def test_the_pool_refills_the_batch_with_kept_groups_only(tiny_base, tmp_path):
    trainer = pool_trainer(tiny_base, tmp_path, "test_pool_three")
    trainer.train()  # one rollout batch, both of its mini-batch updates
    loader = trainer._buffer_for[::4]  # the data loader's 2 prompts
    candidates = loader + pool_order(loader, 6)  # in generation order, one prompt per micro-batch
    kept = [i for i in candidates if i in KEEP]
    assert len(kept) >= 2, "this seed's pool must suffice"
    generated = candidates.index(kept[1]) + 1  # generation stops once the second kept group exists
    assert [r.ids for r in trainer._buffer] == [[kept[0]] * 4, [kept[1]] * 4]
    assert all(r.kept.all() and action_mask(r, True).any() for r in trainer._buffer)
    by_id = {r["id"]: r for r in trainer.train_dataset}
    trainer.state.global_step = 1  # the second update: the buffer serves its own loader batch, no other
    assert trainer._prepare_inputs([by_id[i] for i in trainer._buffer_for]) is trainer._buffer[1]
    with pytest.raises(RuntimeError, match="rollout reuse out of step"):
        trainer._prepare_inputs([by_id[i] for i in trainer._buffer_for[::-1]])
    first = [e for e in trainer.state.log_history if "loss" in e][0]
    assert first["difficulty/pool_prompts"] == generated and first["difficulty/shortfall"] == 0
    # the filter's verdicts per generated micro-batch (one group each): kept in 2 of them
    assert first["difficulty/groups_kept"] == round(2 / generated, 4)
    assert first["difficulty/groups_dropped"] == round(1 - 2 / generated, 4)


def test_a_short_pool_fills_the_batch_with_masked_groups(tiny_base, tmp_path):
    trainer = pool_trainer(tiny_base, tmp_path, "test_pool_one")
    records = sorted(trainer.train_dataset, key=lambda r: r["id"])
    loader = [records[0]] * 4 + [records[3]] * 4  # q0, q3: both dropped
    drawn = trainer._pool_records(6, loader, 0)
    assert drawn == trainer._pool_records(6, loader, 0)  # seeded by (seed, process, the batch's first step)
    candidates = ["q0", "q3"] + [r["id"] for r in drawn[::4]]
    assert candidates[2:] == pool_order(["q0", "q3"], 6)
    batch = trainer._rollout_batch(loader, 0)  # one prompt to keep: the pool cannot fill 2 groups
    kept = [i for i in candidates if i == "q5"]
    unkept = [i for i in candidates if i != "q5"][: 2 - len(kept)]  # the earliest generated fill the batch
    assert [r.ids[0] for r in batch] == kept + unkept
    assert [r.kept.tolist() for r in batch] == [[True] * 4] * len(kept) + [[False] * 4] * len(unkept)
    assert trainer._metrics["difficulty/pool_prompts"] == [8.0]  # all of it generated
    assert trainer._metrics["difficulty/shortfall"] == [float(len(unkept))]
    assert len(trainer._metrics["difficulty/groups_kept"]) == 8


def test_a_run_resumed_mid_batch_redraws_the_pool_of_the_batchs_first_step(tiny_base, tmp_path):
    """Resumed at the second update of a 2-update rollout batch (global step 1, nothing generated yet), the batch is
    regenerated from the prompts the uninterrupted run drew at step 0: the loader's, then the pool's step-0 order
    (every prompt is generated here: only q5 is ever kept), not an order drawn for step 1."""
    trainer = pool_trainer(tiny_base, tmp_path, "test_pool_one")
    records = sorted(trainer.train_dataset, key=lambda r: r["id"])
    loader = [records[0]] * 4 + [records[3]] * 4
    scored, score = [], trainer._score
    trainer._score = lambda rows: scored.append(rows[0]["id"]) or score(rows)  # which prompts, in generation order
    trainer.state.global_step = 1
    trainer._prepare_inputs(loader)
    assert scored == ["q0", "q3"] + pool_order(["q0", "q3"], 6)
    step1 = torch.randperm(8, generator=torch.Generator().manual_seed(1)).tolist()  # what step 1's seed would draw
    assert scored[2:] != [f"q{i}" for i in step1 if i not in (0, 3)]
