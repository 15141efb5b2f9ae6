"""LatentVLM: load/save round trip, loading errors, mirage stage-1 and stage-2 losses and their gradients."""

import json

import pytest
import torch

from vlatent.data import load_records
from vlatent.model import LatentVLM
from vlatent.testing import tiny_image


def write_records(root, specs):
    """specs: list of (id, n_latent_segments, user_image). Writes records + images, returns the jsonl path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (rid, n_latent, user_image) in enumerate(specs):
        images = []
        for j in range(n_latent + 1):
            name = f"images/{rid}-{j}.png"
            tiny_image(seed=10 * i + j).save(root / name)
            images.append(name)
        user = ([{"type": "image", "image": 0}] if user_image else []) + [{"type": "text", "text": "Where next?"}]
        assistant = [{"type": "text", "text": "Let me sketch it."}]
        for j in range(n_latent):
            assistant += [{"type": "latent", "image": j + 1}, {"type": "text", "text": f" step {j}."}]
        assistant.append({"type": "text", "text": " The answer is B."})
        lines.append({"id": rid, "images": images, "answer": "B", "task": "maze", "meta": {},
                      "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    return load_records(write_records(root, [("a", 1, True), ("b", 2, True), ("c", 1, False)]))


def test_round_trip_gives_identical_logits(mirage_model, records, tmp_path):
    path = mirage_model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.glob("*.safetensors")) == ["model.safetensors"]  # mirage has no modules
    assert not list(path.glob("*.bin"))
    saved = json.loads((path / "vlatent_config.json").read_text())
    assert saved["method"] == "mirage" and saved["method_config"]["latent_pad_id"] == mirage_model.method.config.latent_pad_id
    loaded = LatentVLM.from_pretrained(path).eval()
    assert loaded.method.config == mirage_model.method.config
    batch = mirage_model.collator()(records)
    with torch.no_grad():
        a = mirage_model.backbone.logits(mirage_model.run_language_model(mirage_model.embed_inputs(batch), batch)[0])
        b = loaded.backbone.logits(loaded.run_language_model(loaded.embed_inputs(batch), batch)[0])
    assert torch.equal(a, b)


def test_latent_tokens_are_added_once_with_ids_in_the_config(mirage_model, tiny_base):
    tok, cfg = mirage_model.tokenizer, mirage_model.method.config
    for name in ("start", "pad", "end"):
        token = getattr(cfg, f"latent_{name}_token")
        assert tok.convert_tokens_to_ids(token) == getattr(cfg, f"latent_{name}_id")
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    assert mirage_model.backbone.model.get_input_embeddings().weight.shape[0] >= len(tok)
    overridden = LatentVLM.from_pretrained(tiny_base, method="mirage", num_latent_tokens=6, stage=2)
    assert overridden.method.config.num_latent_tokens == 6 and overridden.method.config.stage == 2


def test_loading_errors_name_the_culprit(tiny_base, tmp_path, mirage_model):
    with pytest.raises(ValueError, match="unknown method 'dreamer'"):
        LatentVLM.from_pretrained(tiny_base, method="dreamer")
    with pytest.raises(ValueError, match="base model: pass method="):
        LatentVLM.from_pretrained(tiny_base)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LatentVLM.from_pretrained(tmp_path, method="mirage")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        LatentVLM.from_pretrained(tmp_path / "missing" / "model", method="mirage")
    with pytest.raises(FileNotFoundError, match="could not load 'no-such-org/no-such-model'"):
        LatentVLM.from_pretrained("no-such-org/no-such-model", method="mirage")
    ckpt = mirage_model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="is a 'mirage' checkpoint; got method='text'"):
        LatentVLM.from_pretrained(ckpt, method="text")
    with pytest.raises(ValueError, match=r"unknown key\(s\)"):
        LatentVLM.from_pretrained(tiny_base, method="mirage", num_latent_token=3)


def grads(model):
    named = dict(model.named_parameters())
    return {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}


def test_mirage_stage1_losses_and_gradients(mirage_model, records):
    mirage_model.zero_grad()
    batch = mirage_model.collator()(records)
    out = mirage_model(batch)
    assert set(out.losses) == {"ce", "latent_alignment"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    torch.testing.assert_close(out.loss, 0.1 * out.losses["ce"] + out.losses["latent_alignment"])
    out.losses["latent_alignment"].backward()
    g = grads(mirage_model)
    assert any(".language_model.layers." in n for n in g)
    mirage_model.zero_grad()


def test_mirage_stage1_targets_do_not_train_the_vision_tower(mirage_model, records):
    """The helper-image targets come from the frozen tower: with no inline image, the tower gets no gradient."""
    mirage_model.zero_grad()
    batch = mirage_model.collator()([records[2]])  # record "c": no user image
    assert "pixel_values" not in batch and batch["latent_target_pixel_values"] is not None
    mirage_model(batch).loss.backward()
    g = grads(mirage_model)
    assert not any(n.startswith("backbone.model.model.visual.") for n in g)
    assert any(n.startswith("backbone.model.model.language_model.layers.") for n in g)
    assert "backbone.model.lm_head.weight" in g
    mirage_model.zero_grad()


def test_mirage_stage1_teacher_forces_pooled_targets(mirage_model, records):
    """Alignment is 1 - cos between the state before each slot and the K-pooled helper-image tokens."""
    from vlatent.methods.mirage import pool_to_k

    batch = mirage_model.collator()([records[0]])
    k = mirage_model.method.config.num_latent_tokens
    feats = mirage_model.latent_targets(batch)[0]
    targets = pool_to_k(feats, k)
    torch.testing.assert_close(targets[0], feats[: -(-feats.shape[0] // k)].mean(0))
    with torch.no_grad():
        b, t = mirage_model.latent_slots(batch)
        embeds = mirage_model.embed_inputs(batch).index_put((b, t), targets)
        h = mirage_model.run_language_model(embeds, batch)[0]
        expected = (1 - torch.cosine_similarity(h[b, t - 1], targets, dim=-1)).mean()
        got = mirage_model(batch).losses["latent_alignment"]
    torch.testing.assert_close(got, expected)


def test_mirage_centred_alignment_subtracts_each_slots_batch_mean(mirage_model, records):
    """``centre_targets``: predictions and targets both minus the batch mean target at the same slot index (the j-th of
    K in every segment), then 1 - cos; the mean target alone no longer scores."""
    from vlatent.methods.mirage import pool_to_k

    batch = mirage_model.collator()(records)
    k = mirage_model.method.config.num_latent_tokens
    mirage_model.method.config.centre_targets = True
    try:
        with torch.no_grad():
            targets = torch.cat([pool_to_k(f, k) for f in mirage_model.latent_targets(batch)])  # (segments * k, H)
            b, t = mirage_model.latent_slots(batch)
            embeds = mirage_model.embed_inputs(batch).index_put((b, t), targets)
            h = mirage_model.run_language_model(embeds, batch)[0][b, t - 1]
            segments = targets.view(-1, k, targets.shape[-1])
            assert segments.shape[0] >= 2  # a mean over one segment would centre every target to zero
            mean = segments.mean(0).repeat(segments.shape[0], 1)  # (segments * k, H): slot j's mean, in slot order
            expected = (1 - torch.cosine_similarity(h - mean, targets - mean, dim=-1)).mean()
            got = mirage_model(batch).losses["latent_alignment"]
    finally:
        mirage_model.method.config.centre_targets = False
    torch.testing.assert_close(got, expected)


def test_pool_to_k_remainder_rule():
    from vlatent.methods.mirage import pool_to_k

    x = torch.arange(10.0).unsqueeze(1)  # 10 tokens, K=4 -> chunks of 3, 3, 2, 2
    assert pool_to_k(x, 4).squeeze(1).tolist() == [1.0, 4.0, 6.5, 8.5]
    with pytest.raises(ValueError, match="fewer than K=4"):
        pool_to_k(x[:3], 4)


def test_mirage_stage2_alignment_scores_the_latents_it_feeds_itself(tiny_base, records):
    """``stage2_alignment_weight``: the latents stage 2 feeds back (each the hidden state before its slot, fed token by
    token here) against the K-pooled helper-image targets, 1 - cos, added to CE at that weight."""
    from vlatent.methods.mirage import pool_to_k

    model = LatentVLM.from_pretrained(tiny_base, method="mirage", stage=2, stage2_alignment_weight=0.5).eval()
    batch = model.collator()(records)
    pad_id, k = model.method.config.latent_pad_id, model.method.config.num_latent_tokens
    with torch.no_grad():
        out = model(batch)
        targets = torch.cat([pool_to_k(f, k) for f in model.latent_targets(batch)])
        embeds, positions, fed = model.embed_inputs(batch), model.position_ids(batch), []
        for r in range(len(records)):
            cache, h = None, None
            for t in range(int(batch["attention_mask"][r].sum())):
                x = h if batch["input_ids"][r, t] == pad_id else embeds[r, t]
                if batch["input_ids"][r, t] == pad_id:
                    fed.append(h)
                o = model.backbone(x.view(1, 1, -1), positions[:, r:r + 1, t:t + 1],
                                   batch["attention_mask"][r:r + 1, :t + 1], past_key_values=cache, use_cache=True)
                cache, h = o.past_key_values, o.last_hidden_state[0, 0]
    expected = (1 - torch.cosine_similarity(torch.stack(fed), targets, dim=-1)).mean()
    torch.testing.assert_close(out.losses["latent_alignment"], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, out.losses["ce"] + 0.5 * expected, atol=1e-4, rtol=1e-4)


def test_mirage_stage2_matches_step_by_step_recurrence(tiny_base, records):
    """Stage 2's batched unrolling equals feeding each row token by token on the KV cache, hidden states fed back
    at every latent slot; CE trains every layer through the chain."""
    model = LatentVLM.from_pretrained(tiny_base, method="mirage", stage=2).eval()
    batch = model.collator()(records)
    out = model(batch)
    assert set(out.losses) == {"ce"} and torch.isfinite(out.loss)

    pad_id = model.method.config.latent_pad_id
    with torch.no_grad():
        embeds = model.embed_inputs(batch)
        positions = model.position_ids(batch)
        losses = []
        for r in range(len(records)):
            n = int(batch["attention_mask"][r].sum())
            cache, h, filled = None, None, []
            for t in range(n):
                x = h if batch["input_ids"][r, t] == pad_id else embeds[r, t]
                o = model.backbone(x.view(1, 1, -1), positions[:, r:r + 1, t:t + 1],
                                   batch["attention_mask"][r:r + 1, :t + 1], past_key_values=cache, use_cache=True)
                cache, h = o.past_key_values, o.last_hidden_state[0, 0]
                filled.append(h)
            hidden = torch.stack(filled).unsqueeze(0)
            losses.append((model.lm_loss(hidden, batch["labels"][r:r + 1, :n]),
                           int((batch["labels"][r, 1:n] != -100).sum())))
        reference = sum(l * c for l, c in losses) / sum(c for _, c in losses)
    torch.testing.assert_close(out.loss, reference, atol=1e-4, rtol=1e-4)

    out.loss.backward()
    g = grads(model)
    assert any(".language_model.layers.0." in n for n in g) and "backbone.model.lm_head.weight" in g

    # gradient checkpointing drops the KV cache: the multipass unrolling must give the same loss and gradients
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.train().gradient_checkpointing_enable()
    try:
        again = model(batch)
        torch.testing.assert_close(again.loss, out.loss, atol=1e-5, rtol=1e-5)
        again.loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, first[name], atol=1e-5, rtol=1e-3, msg=name)
    finally:
        model.backbone.model.gradient_checkpointing_disable()


def test_forward_refuses_a_batch_collated_for_another_k(mirage_model, records):
    from vlatent.data import InterleavedCollator

    other = InterleavedCollator(mirage_model.processor, latent_tokens=mirage_model.method.config.latent_tokens,
                                num_latent_tokens=2, latent_mode="latent")
    with pytest.raises(ValueError, match="latent pad tokens but .* latent targets"):
        mirage_model(other(records))
