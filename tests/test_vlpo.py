"""VLPO: the objective on hand-computed numbers, rollouts that replay what the generator did (the latent off-by-one),
rewards through vlatent.scoring, the latent term switch, learning on the tiny model, and 2-process ZeRO-3."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainingArguments

from vlatent.generation import Generation, TextSegment, normalize_inputs
from vlatent.methods import Mirage, register_method
from vlatent.model import LatentVLM
from vlatent.testing import tiny_image
from vlatent.training import VLPOConfig, VLPOTrainer, register_reward
from vlatent.training.rewards import accuracy_reward, format_reward, get_reward, score_completions
from vlatent.training.vlpo import (action_log_probs, aggregate, build_rollouts, clipped_objective, gaussian_log_prob,
                                   group_advantages, kl_k3)

from conftest import PREFIXES, PROMPTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train.vlpo import main as vlpo_main  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# The objective on hand-computed numbers


def test_gaussian_log_prob_of_a_stored_latent():
    z, mu = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    # -(1 + 4) / 2 - 2 * log(1) - log(2 pi) = -2.5 - 1.837877
    assert gaussian_log_prob(z, mu, 1.0).item() == pytest.approx(-4.337877, abs=1e-5)
    # sigma = 2: -(5) / 8 - 2 log 2 - log(2 pi) = -0.625 - 1.386294 - 1.837877
    assert gaussian_log_prob(z, mu, 2.0).item() == pytest.approx(-3.849171, abs=1e-5)
    # matches torch's Normal, batched over leading dims
    z, mu = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    ref = torch.distributions.Normal(mu, 0.3).log_prob(z).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(z, mu, 0.3), ref)


def test_ratio_clipping_and_dual_clip():
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 4.0, 1.1]))  # ratios against old = 0
    old = torch.zeros(6)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 2.0])
    loss, low, high = clipped_objective(lp, old, adv, epsilon=0.2, epsilon_high=0.3)
    # r=1.5 A=+1: -min(1.5, 1.3) ; r=1.5 A=-1: -min(-1.5, -1.3) ; r=0.5 A=+1: -min(0.5, 0.8)
    # r=0.5 A=-1: -min(-0.5, -0.8) ; r=4 A=-1: -min(-4, -1.3) ; r=1.1 A=2: inside the region
    torch.testing.assert_close(loss, torch.tensor([-1.3, 1.5, -0.5, 0.8, 4.0, -2.2]))
    assert low.tolist() == [False, False, False, True, False, False]
    assert high.tolist() == [True, False, False, False, False, False]
    dual, _, _ = clipped_objective(lp, old, adv, epsilon=0.2, epsilon_high=0.3, delta=3.0)
    torch.testing.assert_close(dual, torch.tensor([-1.3, 1.5, -0.5, 0.8, 3.0, -2.2]))  # A < 0 bounded by delta
    # on-policy (old = current, detached) the gradient is A * d log p
    lp = torch.tensor([0.3, -0.7], requires_grad=True)
    clipped_objective(lp, lp.detach(), torch.tensor([2.0, -1.0]), 0.2, 0.2)[0].sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-2.0, 1.0]))
    # a latent's log-ratio can be huge: clamped to 20 before exp, so the loss stays finite
    loss, _, _ = clipped_objective(torch.tensor([500.0]), torch.tensor([0.0]), torch.tensor([-1.0]), 0.2, 0.2)
    assert loss.item() == pytest.approx(math.exp(20))


def test_group_advantages_including_an_all_equal_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1
    torch.testing.assert_close(adv[:4], torch.tensor([expected[0], expected[1], expected[1], expected[0]]))
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: no signal, no nan
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    batch_std = rewards.std()  # 0.9258
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"),
                               torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]) / (batch_std + 1e-4))


def test_kl_estimator_and_loss_types():
    assert kl_k3(torch.tensor([0.0]), torch.tensor([math.log(2)])).item() == pytest.approx(2 - math.log(2) - 1)
    assert kl_k3(torch.tensor([0.4]), torch.tensor([0.4])).item() == 0.0
    bounded = kl_k3(torch.tensor([0.0, 2.0]), torch.tensor([300.0, 0.0]))  # clamped; exp(-2) + 2 - 1
    assert bounded.tolist() == [10.0, pytest.approx(math.exp(-2) + 1)]
    per = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate(per, mask, "grpo", 4).item() == pytest.approx((1.5 + 3.0) / 2)
    assert aggregate(per, mask, "bnpo", 4).item() == pytest.approx(6.0 / 3)
    assert aggregate(per, mask, "dr_grpo", 4).item() == pytest.approx(6.0 / (2 * 4))
    assert aggregate(per, mask, "dapo", 4, normalizer=4.0).item() == pytest.approx(6.0 / 4)


def test_config_errors_name_the_knob():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_generation'\]"):
        VLPOConfig.from_dict({"num_generation": 4})
    for bad, match in [({"num_generations": 1}, "num_generations"), ({"loss_type": "ppo"}, "loss_type"),
                       ({"delta": 1.1}, "delta"), ({"latent_sigma": 0}, "latent_sigma"),
                       ({"reward_funcs": ["acuracy"]}, "unknown reward 'acuracy'"),
                       ({"reward_weights": [1, 2]}, "reward_weights"), ({"scale_rewards": True}, "scale_rewards")]:
        with pytest.raises(ValueError, match=match):
            VLPOConfig.from_dict(bad)
    VLPOConfig.from_dict({"score_latents": False, "latent_exploration": False, "latent_sigma": 0})  # text-only GRPO


# ---------------------------------------------------------------------------------------------------------------------
# Rewards


def test_rewards_go_through_scoring():
    completions = ["The answer is B.", "I think (A)", "A or B", "x = 3.0 cm", "The answer is left.", "hmm"]
    answer = ["B", "B", "A", "3", "left", "A"]
    options = [["cat", "dog"], ["cat", "dog"], None, None, None, None]
    assert accuracy_reward(completions, answer=answer, options=options) == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert accuracy_reward(["B"], answer=[None]) == [None]
    assert format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    @register_reward("test_chars")
    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    assert get_reward("test_chars") is length
    columns = {"id": ["a", "b"], "answer": ["B", None]}
    table = score_completions([accuracy_reward, length], ["accuracy", "test_chars"], ["B", "no"], columns)
    assert table[0] == [1.0, 1.0] and math.isnan(table[1][0]) and table[1][1] == 2.0
    with pytest.raises(ValueError, match="no reward applies to completion 1 \\(record 'b'\\)"):
        score_completions([accuracy_reward], ["accuracy"], ["B", "no"], columns)
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        score_completions([lambda completions, **kw: [1.0]], ["short"], ["B", "no"], columns)
    assert get_reward("vlatent.training.rewards:format_reward") is format_reward
    with pytest.raises(ValueError, match="cannot import"):
        get_reward("vlatent.training.rewards:nope")


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts replay the generator exactly


@pytest.mark.parametrize("bottleneck", [False, True])
def test_rollouts_score_each_latent_with_the_state_that_produced_it(switching_model, bottleneck):
    """Rows enter latent segments at different steps; the teacher-forced forward over (prompt + completion, sampled
    latents in the slots) must give back the mean each latent was sampled around: mu(h_q), q = the slot before (under
    ``latent_bottleneck`` too: the forward masks as generation did)."""
    model, sigma = switching_model, 0.05
    if bottleneck:
        model = copy.deepcopy(model)
        model.method.config.latent_bottleneck = True
    images, prompts, prefixes = normalize_inputs([tiny_image(0), tiny_image(1), None], PROMPTS, PREFIXES)
    gens = model.generate(images, prompts, max_new_tokens=30, prefix=prefixes, latent_sigma=sigma,
                          generator=torch.Generator().manual_seed(0))  # greedy text, sampled latents
    assert sum(len(g.latent_segments) for g in gens) >= 3
    seg = gens[1].latent_segments[0]
    assert seg.means.shape == seg.latents.shape and not torch.allclose(seg.means, seg.latents)  # noise was added
    assert all(g.num_steps == len(g.token_ids) for g in gens)
    r = build_rollouts(model, images, prompts, prefixes, gens, torch.zeros(3), ["a", "b", "c"])
    end_id = model.method.config.latent_end_id
    assert int(r.latent_mask.sum()) == sum(s.k for g in gens for s in g.latent_segments) == r.latents.shape[0]
    forced = r.completion_ids == end_id
    assert forced.any() and not (r.text_mask & forced).any() and not (r.latent_mask & forced).any()

    with torch.no_grad():
        lp = action_log_probs(model, r, temperature=1.0, sigma=sigma, score_latents=True)
    means = torch.cat([s.means for g in gens for s in g.latent_segments])
    # the same Gaussian log-prob as from the generator's own means (not those of the slot itself: off by one)
    expected = gaussian_log_prob(r.latents.float(), means, sigma)
    torch.testing.assert_close(lp[r.latent_mask], expected, atol=2e-2, rtol=1e-4)
    off_by_one = gaussian_log_prob(r.latents.float()[1:], means[:-1], sigma)
    assert (lp[r.latent_mask][1:] - off_by_one).abs().max() > 100
    # text actions: log-softmax of the sampled tokens, all finite; nothing scored outside the completions
    assert torch.isfinite(lp[r.text_mask]).all() and (lp[r.text_mask] <= 0).all()
    assert (lp[~(r.text_mask | r.latent_mask)] == 0).all()

    # a sampled special token (here an image placeholder) is an ordinary token embedding in the completion
    image_pad = model.backbone.image_token_id
    odd = Generation(segments=[TextSegment("?", [image_pad])], finish_reason="eos", num_steps=2,
                     token_ids=[image_pad, model.tokenizer.eos_token_id])
    r = build_rollouts(model, images[:1], prompts[:1], prefixes[:1], [odd], torch.zeros(1), ["d"])
    with torch.no_grad():
        lp = action_log_probs(model, r, temperature=1.0, sigma=sigma, score_latents=True)
    assert r.text_mask.tolist() == [[True, True]] and torch.isfinite(lp).all()


# ---------------------------------------------------------------------------------------------------------------------
# Trainer-level: the latent term switch, learning


@register_method
class HeadMirage(Mirage):
    """Mirage with a linear latent head: a method whose ``next_latent`` has parameters of its own."""

    name = "test_head_mirage"

    def __init__(self, config, hidden_size):
        super().__init__(config, hidden_size)
        self.head = torch.nn.Linear(hidden_size, hidden_size)

    def next_latent(self, hidden, context=None):
        return self.head(hidden)


def write_prompts(root: Path, n: int, answers="AB", text_only_every: int = 0) -> Path:
    """Records asking a 2-choice question about a picture (every ``text_only_every``-th without one); the assistant
    turn opens a latent segment and answers."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        for j in range(2):
            tiny_image(seed=2 * i + j).save(root / f"images/{i}-{j}.png")
        answer = answers[i % len(answers)]
        picture = [] if text_only_every and i % text_only_every == 0 else [{"type": "image", "image": 0}]
        lines.append({"id": f"q{i}", "images": [f"images/{i}-0.png", f"images/{i}-1.png"], "answer": answer,
                      "task": "depth", "meta": {},
                      "messages": [{"role": "user", "content": [
                          *picture, {"type": "text", "text": "Which point is closer to the camera? Answer A or B."}]},
                          {"role": "assistant", "content": [{"type": "latent", "image": 1},
                                                            {"type": "text", "text": f" {answer}"}]}]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def trainer_for(model, tmp_path, records, **vlpo):
    from vlatent.data import load_records

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3,
                             max_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                             disable_tqdm=True, logging_steps=1)
    config = VLPOConfig(num_generations=4, max_completion_length=8, prefix="<|latent_start|>", latent_sigma=0.5,
                        latent_exploration=True, reward_funcs=["test_length"], **vlpo)
    return VLPOTrainer(model=model, args=args, vlpo=config, train_dataset=load_records(records))


@pytest.mark.parametrize("score_latents", [True, False])
def test_latent_term_off_leaves_the_latent_head_without_gradient(tiny_base, tmp_path, score_latents):
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="test_head_mirage", num_latent_tokens=2)
    records = write_prompts(tmp_path, 4)
    trainer = trainer_for(model, tmp_path, records, score_latents=score_latents)
    rollouts = trainer.rollout(trainer.train_dataset[:1] * 4)  # one group of 4
    assert rollouts.latent_mask.sum() == 8 and rollouts.advantages.abs().sum() > 0
    loss = trainer.compute_loss(trainer.model, rollouts)
    loss.backward()
    head = model.method.head.weight.grad
    lm = model.backbone.model.lm_head.weight.grad
    assert lm is not None and lm.abs().sum() > 0  # the text term always trains
    if score_latents:
        assert head is not None and head.abs().sum() > 0
    else:
        assert head is None, "text-only GRPO must not reach the latent head"
    assert ("latent_log_prob" in trainer._metrics) == score_latents


@register_reward("test_length")
def _length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def recipe(tmp_path, name, **entries) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(entries))
    return str(path)


@pytest.mark.slow
def test_mean_reward_rises_with_text_and_latent_gradients(tmp_path, tiny_base):
    """SFT teaches the tiny model to answer "A" or "B" after a latent segment (answers random w.r.t. the picture);
    VLPO on questions whose answer is always B then raises the accuracy reward, latent steps scored."""
    from train.sft import main as sft

    sft_cfg = recipe(tmp_path, "sft.yaml", model=str(tiny_base), method="mirage",
                     method_config={"stage": 2, "num_latent_tokens": 2},
                     data={"train": str(write_prompts(tmp_path / "sft", 16, "AB"))},
                     training={"output_dir": str(tmp_path / "sft_out"), "per_device_train_batch_size": 8,
                               "learning_rate": 3e-3, "max_steps": 20, "lr_scheduler_type": "constant",
                               "logging_steps": 20, "seed": 0, "disable_tqdm": True})
    assert sft(["--config", sft_cfg]) == 0
    cfg = recipe(tmp_path, "vlpo.yaml", model=str(tmp_path / "sft_out"),
                 data={"train": str(write_prompts(tmp_path / "rl", 16, "B"))},
                 vlpo={"num_generations": 8, "max_completion_length": 6, "prefix": "<|latent_start|>",
                       "latent_sigma": 0.5, "latent_exploration": True, "updates_per_rollout": 1,
                       "reward_funcs": ["accuracy"]},
                 training={"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 32,
                           "learning_rate": 3e-3, "max_steps": 12, "lr_scheduler_type": "constant",
                           "logging_steps": 1, "seed": 0, "disable_tqdm": True})
    assert vlpo_main(["--config", cfg]) == 0
    logs = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "reward" in e]
    rewards = [e["reward"] for e in logs]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    assert all(e["completions/latent_steps"] >= 2 and math.isfinite(e["latent_log_prob"]) for e in logs)
    assert LatentVLM.from_pretrained(tmp_path / "out").method.name == "mirage"


def test_bad_vlpo_recipes_fail_before_any_step(tmp_path, tiny_base, capsys):
    data = write_prompts(tmp_path / "data", 4)
    good = dict(model=str(tiny_base), method="mirage", data={"train": str(data)}, vlpo={"num_generations": 2},
                training={"output_dir": str(tmp_path / "o"), "per_device_train_batch_size": 2, "max_steps": 1})

    def fails(match, **change):
        assert vlpo_main(["--config", recipe(tmp_path, "r.yaml", **{**good, **change})]) == 2
        assert match in capsys.readouterr().err

    fails("needs a 'vlpo:' section", vlpo=None)
    fails("unknown key(s) ['num_generation']", vlpo={"num_generation": 2})
    fails("data.eval is not used by VLPO", data={"train": str(data), "eval": str(data)})
    fails("must be a multiple of num_generations=2", training={**good["training"], "per_device_train_batch_size": 3})
    fails("method 'text' has no latent steps to score", method="text", vlpo={"num_generations": 2})
    fails("unknown reward 'nope'", vlpo={"reward_funcs": ["nope"]})
    assert not (tmp_path / "o").exists()
    from train.__main__ import main as train_cli

    assert train_cli(["vlpo", "--config", recipe(tmp_path, "r.yaml", **{**good, "vlpo": None})]) == 2


def test_shipped_recipes_parse(monkeypatch):
    from train.vlpo import check_recipe
    from vlatent.training import load_recipe

    monkeypatch.chdir(ROOT)
    paths = sorted(ROOT.glob("train/recipes/vlpo_*.yaml")) + sorted(ROOT.glob("train/recipes/tiny/vlpo*.yaml"))
    assert len(paths) >= 5
    configs = {p.name: check_recipe(load_recipe(p)) for p in paths}
    assert configs["vlpo_monet.yaml"].score_latents and not configs["vlpo_monet_grpo.yaml"].score_latents
    assert configs["vlpo_monet.yaml"].latent_sigma == 10.0 and configs["vlpo_monet.yaml"].num_generations == 8


@pytest.mark.slow
def test_deepspeed_zero3_two_processes(tmp_path, tiny_base):
    """Two ranks, ZeRO-3: rollouts of different lengths on each rank (synced generation), text-only prompts beside
    prompts with a picture, two updates per rollout batch (old log-probs, clipping), a KL reference, dual clip, a
    reward given as module:function, a difficulty pool (q0 and q1 dropped: the ranks need different refill rounds,
    which they must run together), and the checkpoint written from the gathered weights."""
    (tmp_path / "user_rewards.py").write_text(
        "def length(completions, **columns):\n    return [float(len(c)) for c in completions]\n"
        "def half(completions, id, **columns):  # groups of 2: one right (kept), but none for q0, q1 (dropped)\n"
        "    return [float(i % 2 == 0 and r not in ('q0', 'q1')) for i, r in enumerate(id)]\n")
    cfg = recipe(tmp_path, "vlpo.yaml", model=str(tiny_base), method="mirage", method_config={"num_latent_tokens": 2},
                 data={"train": str(write_prompts(tmp_path / "data", 8, text_only_every=2))},
                 deepspeed=str(ROOT / "train" / "ds_configs" / "zero3.json"),
                 vlpo={"num_generations": 2, "max_completion_length": 8, "prefix": "<|latent_start|>",
                       "updates_per_rollout": 2, "beta": 0.05, "delta": 3.0, "epsilon_high": 0.28,
                       "reward_funcs": ["user_rewards:length", "accuracy", "user_rewards:half"],
                       "difficulty_filter": True, "difficulty_reward": "user_rewards:half", "difficulty_pool": 2},
                 training={"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "max_steps": 4,
                           "learning_rate": 1e-3, "logging_steps": 1, "seed": 0, "disable_tqdm": True})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train" / "vlpo.py"), "--config", cfg], env=env, capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    logs = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    assert len(logs) == 4 and all(math.isfinite(e["loss"]) and math.isfinite(e["kl"]) for e in logs)
    assert all({"clip_ratio/region_mean", "latent_log_prob"} <= set(e) for e in logs)
    generated = [e for e in logs if "reward" in e]  # rollout batches at steps 1 and 3, their second halves at 2, 4
    assert [e["step"] for e in generated] == [1, 3] and all(e["completions/latent_steps"] >= 2 for e in generated)
    assert logs[1]["clip_ratio/region_mean"] > 0  # the reused rollouts are off-policy: the clip binds somewhere
    # 2 prompts per rank and rollout batch; the 8 records pass in 2 batches, so a rank meets q0 or q1 and refills
    assert max(e["difficulty/pool_prompts"] for e in generated) > 2, generated
    trained = LatentVLM.from_pretrained(tmp_path / "out")
    base = LatentVLM.from_pretrained(tiny_base, method="mirage", num_latent_tokens=2)
    assert not torch.allclose(trained.backbone.model.lm_head.weight, base.backbone.model.lm_head.weight)
