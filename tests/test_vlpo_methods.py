"""VLPO over every registered method: it trains a step, or it is refused before the first rollout with the reason.
Sketchpad's latents are scored around its vision head's output given the generation context."""

import pytest
import torch
from transformers import TrainingArguments

from vlatent.data import load_records
from vlatent.methods import list_methods
from vlatent.generation import normalize_inputs
from vlatent.model import LatentVLM
from vlatent.testing import tiny_image
from vlatent.training import VLPOConfig, VLPOTrainer, register_reward
from vlatent.training.vlpo import action_log_probs, build_rollouts, gaussian_log_prob

from test_backbones import METHOD_CONFIG
from test_vlpo import write_prompts

# why each method that cannot have its latents scored is refused (score_latents: true)
REFUSED = {"text": "has no latent steps to score", "perception": "has no latent steps to score",
           "cocova": "VLPO cannot score its latents: its LQ-Former's latent depends on the generation state"}


@register_reward("test_text_sum")
def _text_sum(completions, **kwargs):
    """Differs between any two different completions (almost surely): every group has an advantage."""
    return [float(sum(map(ord, c)) % 101) for c in completions]


@pytest.fixture(scope="module")
def depth_tokenizer(tmp_path_factory):
    from vlatent.decoders import DepthTokenizer
    from vlatent.decoders.depth import DepthTokenizerConfig

    tokenizer = DepthTokenizer(DepthTokenizerConfig(image_size=8, codebook_size=8, block_out_channels=(8, 8, 8),
                                                    latent_channels=4))
    return str(tokenizer.save_pretrained(tmp_path_factory.mktemp("depth") / "tokenizer"))


def build(tiny_base, method, depth_tokenizer):
    config = dict(METHOD_CONFIG.get(method, {}))
    if method == "perception":
        config["tokenizer"] = depth_tokenizer
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_base, method=method, **config)


def trainer_for(model, tmp_path, **vlpo):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3,
                             max_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                             logging_steps=1)
    prefix = "<|latent_start|>" if model.method.uses_latents else None
    if prefix and model.method.config.latent_start_token != prefix:
        prefix = model.method.config.latent_start_token
    config = VLPOConfig(num_generations=2, max_completion_length=10, prefix=prefix, updates_per_rollout=1,
                        latent_sigma=0.5, reward_funcs=["test_text_sum"], **vlpo)
    return VLPOTrainer(model=model, args=args, vlpo=config,
                       train_dataset=load_records(write_prompts(tmp_path / "data", 2)))


@pytest.mark.parametrize("method", [m for m in list_methods() if not m.startswith("test_")])
def test_each_method_trains_a_step_or_is_refused(method, tiny_base, tmp_path, depth_tokenizer, monkeypatch):
    model = build(tiny_base, method, depth_tokenizer)
    if method in REFUSED:
        generated = []
        monkeypatch.setattr(model, "generate", lambda *a, **k: generated.append(1))
        with pytest.raises(ValueError, match=REFUSED[method]) as e:
            trainer_for(model, tmp_path)
        assert "score_latents: false" in str(e.value) and not generated
        monkeypatch.undo()
        # the text-only variant trains (latents, if any, generated and masked out)
        trainer = trainer_for(model, tmp_path, score_latents=False)
    else:
        trainer = trainer_for(model, tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 1 and logs[0]["completions/mean_length"] > 0 and logs[0]["frac_reward_zero_std"] < 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    if method not in REFUSED:
        assert logs[0]["completions/latent_steps"] > 0


def test_sketchpad_latents_scored_around_the_heads_output_in_context(tiny_base, depth_tokenizer, monkeypatch):
    """Two sketches per answer after an input image: the teacher-forced means must be what the vision head gave in
    generation, where the first sketch saw the image and the second saw the image and the first sketch."""
    model = build(tiny_base, "sketchpad", depth_tokenizer).eval()
    k, sigma, start_id = model.method.config.num_latent_tokens, 0.02, model.method.config.latent_start_id
    start = model.method.config.latent_start_token

    def open_sketches(logits, state):  # steer the untrained model: every text step opens a new sketch
        forced = torch.full_like(logits, float("-inf"))
        forced[:, start_id] = 0.0
        return forced

    monkeypatch.setattr(model.method, "constrain_logits", open_sketches)
    images, prompts, prefixes = normalize_inputs([tiny_image(0), tiny_image(1)], ["Draw it.", "Draw it again."],
                                                 start)
    gens = model.generate(images, prompts, max_new_tokens=2 * k + 3, prefix=prefixes, latent_sigma=sigma,
                          generator=torch.Generator().manual_seed(0))
    assert [len(g.latent_segments) for g in gens] == [2, 2]
    monkeypatch.undo()
    r = build_rollouts(model, images, prompts, prefixes, gens, torch.zeros(2), ["a", "b"])
    with torch.no_grad():
        lp = action_log_probs(model, r, temperature=1.0, sigma=sigma, score_latents=True)
    means = torch.cat([s.means for g in gens for s in g.latent_segments])  # (4 k, hidden), row-major
    expected = gaussian_log_prob(r.latents.float(), means, sigma)
    torch.testing.assert_close(lp[r.latent_mask], expected, atol=5e-2, rtol=1e-4)
    # the context matters: the second sketch's means differ from the first's by far more than the tolerance
    assert (gaussian_log_prob(r.latents.float()[k : 2 * k], means[:k], sigma) - expected[k : 2 * k]).abs().min() > 1
