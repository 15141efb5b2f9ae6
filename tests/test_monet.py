"""monet: observation spans in the collator, the stage-2 sequence and attention mask, the three stages' losses and
where their gradients go (latent-only backprop), generation with monet's tokens, and a small overfitting test."""

import copy
import json

import pytest
import torch

from vlatent.data import InterleavedCollator, load_records
from vlatent.methods import create_method
from vlatent.methods.monet import MonetConfig, additive_mask, alignment_loss, stage2_allowed
from vlatent.model import LatentVLM
from vlatent.testing import tiny_image

K = 2  # latent tokens per segment in these tests (the default, 8, is checked below)
OBS = ["The path turns left.", "Blue is up.", "Then right.", "A wall."]


def write_records(root):
    """Four records: 'a' (the hand-checked one), 'b' with two latent segments, 'c' without a question image, 'd'."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for j in range(4):
        tiny_image(seed=j).save(root / f"images/{j}.png")
    images = [f"images/{j}.png" for j in range(4)]

    def record(rid, n_latent, question_image, obs):
        user = ([{"type": "image", "image": 0}] if question_image else []) + [{"type": "text", "text": "Where next?"}]
        assistant = [{"type": "text", "text": "Let me sketch it."}]
        for j in range(n_latent):
            assistant += [{"type": "latent", "image": j + 1}, {"type": "text", "text": obs[j], "observation": True}]
        assistant.append({"type": "text", "text": " The answer is B."})
        return {"id": rid, "images": images, "answer": "B", "task": "maze", "meta": {},
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    lines = [record("a", 1, True, OBS[:1]), record("b", 2, True, OBS[1:3]), record("c", 1, False, OBS[3:]),
             record("d", 1, True, OBS[2:3])]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_records(write_records(tmp_path_factory.mktemp("monet_records")))


@pytest.fixture(scope="module")
def stage1(tiny_base):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_base, method="monet", num_latent_tokens=K)


@pytest.fixture(scope="module")
def stage1_ckpt(stage1, tmp_path_factory):
    return stage1.save_pretrained(tmp_path_factory.mktemp("monet") / "stage1")


@pytest.fixture(scope="module")
def stage2(stage1_ckpt):
    """Stage 2 from the stage-1 checkpoint, its teacher given by path (loaded on first use)."""
    return LatentVLM.from_pretrained(stage1_ckpt, stage=2, teacher=str(stage1_ckpt))


@pytest.fixture(scope="module")
def stage3(stage1_ckpt, stage2, tmp_path_factory):
    """Stage 3 from the stage-1 checkpoint; its teacher is the stage-2 model (a copy, set in memory)."""
    model = LatentVLM.from_pretrained(stage1_ckpt, stage=3)
    model.method.set_teacher(copy.deepcopy(stage2))
    return model


def decode(model, ids):
    return model.tokenizer.decode(ids)


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


# -- config, tokens, collator ------------------------------------------------------------------------


def test_config_tokens_and_stages(stage1):
    cfg = MonetConfig()
    assert (cfg.num_latent_tokens, cfg.observation_ce_weight) == (8, 2.0)
    assert cfg.latent_tokens.segment(1) == "<abs_vis_token><abs_vis_token_pad></abs_vis_token>"
    method = create_method("monet", hidden_size=64)
    assert method.special_tokens() == ["<abs_vis_token>", "<abs_vis_token_pad>", "</abs_vis_token>", "<observation>",
                                       "</observation>"]
    assert [create_method("monet", 64, stage=s).latent_mode() for s in (1, 2, 3)] == ["image", "image+latent", "latent"]
    with pytest.raises(ValueError, match="stages 1, 2 and 3"):
        create_method("monet", 64, stage=4)
    tok, c = stage1.tokenizer, stage1.method.config
    for token in method.special_tokens():
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    assert tok.convert_tokens_to_ids("<observation>") == c.observation_start_id
    assert tok.convert_tokens_to_ids("</observation>") == c.observation_end_id
    assert not list(stage1.method.parameters()) and not stage1.method.state_dict()


def test_collator_observation_mask_and_stage_layouts(stage1, stage2, stage3, records):
    a = records[:1]
    pad = "<|image_pad|>"
    obs = "<observation>The path turns left.</observation>"
    tail = " The answer is B.<|im_end|>\n"

    b1 = stage1.collator()(a)
    assert "teacher" not in b1
    text = decode(stage1, b1["input_ids"][0])
    n_aux = 4  # a 56x56 image: 4x4 patches of 14 px, merged 2x2 -> 4 tokens (the question image is the same size)
    assert text.count(pad) == 2 * n_aux
    assert text.endswith(f"Let me sketch it.<|vision_start|>{pad * n_aux}<|vision_end|>{obs}{tail}")
    assert b1["observation_mask"].dtype == torch.bool
    inside = b1["observation_mask"][0].nonzero().flatten()
    assert decode(stage1, b1["input_ids"][0, inside]) == "The path turns left."
    assert (inside.diff() == 1).all()  # one contiguous span, strictly between the tags
    ids = b1["input_ids"][0].tolist()
    assert ids[inside[0] - 1] == stage1.method.config.observation_start_id
    assert ids[inside[-1] + 1] == stage1.method.config.observation_end_id
    sup = decode(stage1, b1["input_ids"][0][b1["labels"][0] != -100])
    assert sup == f"Let me sketch it.{obs} The answer is B.<|im_end|>"  # tags supervised, image tokens not

    b2 = stage2.collator()(a)
    text2 = decode(stage2, b2["input_ids"][0])
    segment = "<abs_vis_token>" + "<abs_vis_token_pad>" * K + "</abs_vis_token>"
    assert text2.endswith(f"Let me sketch it.<|vision_start|>{pad * n_aux}<|vision_end|>{segment}{obs}{tail}")
    assert decode(stage2, b2["input_ids"][0][b2["labels"][0] != -100]) == (
        f"Let me sketch it.<abs_vis_token></abs_vis_token>{obs} The answer is B.<|im_end|>")
    assert b2["image_grid_thw"].shape[0] == 2 and b2["num_latent_segments"].tolist() == [1]
    # the teacher sees the stage-1 sequence, with the same observation tokens in the same order
    assert torch.equal(b2["teacher"]["input_ids"], b1["input_ids"])
    t_obs, s_obs = b2["teacher"]["observation_mask"], b2["observation_mask"]
    assert torch.equal(b2["teacher"]["input_ids"][t_obs], b2["input_ids"][s_obs])

    b3 = stage3.collator()(a)
    assert decode(stage3, b3["input_ids"][0]).endswith(f"Let me sketch it.{segment}{obs}{tail}")
    assert b3["image_grid_thw"].shape[0] == 1 and "latent_target_pixel_values" not in b3
    assert torch.equal(b3["teacher"]["input_ids"], b2["input_ids"])

    # opt-in only: the same records through a plain collator have neither tags nor the mask
    plain = InterleavedCollator(stage1.processor, latent_tokens=None, latent_mode="image")(a)
    assert "observation_mask" not in plain and "observation" not in decode(stage1, plain["input_ids"][0])
    for kwargs, message in [(dict(latent_mode="image+latent"), "needs latent_tokens"),
                            (dict(latent_mode="image", teacher_latent_mode="x"), "teacher_latent_mode"),
                            (dict(latent_mode="image", observation_tokens=("<o>",)), "two different"),
                            (dict(latent_mode="image", observation_tokens=("<o>", "</o>")), "not a single token")]:
        with pytest.raises(ValueError, match=message):
            InterleavedCollator(stage1.processor, latent_tokens=None, **kwargs)


def test_supervise_tags_false_leaves_the_released_tags_unlabelled(stage1, stage2, stage3, records):
    """As released (src/main.py:172, 235, 308 ignore_ids): no label on <observation>, </observation>,
    </abs_vis_token> (nor on latent pads and image tokens, as by default); <abs_vis_token> and the text keep theirs."""
    obs = "The path turns left."
    expected = {1: f"Let me sketch it.{obs} The answer is B.<|im_end|>",
                2: f"Let me sketch it.<abs_vis_token>{obs} The answer is B.<|im_end|>",
                3: f"Let me sketch it.<abs_vis_token>{obs} The answer is B.<|im_end|>"}
    for stage, model in ((1, stage1), (2, stage2), (3, stage3)):
        default = model.collator()(records[:1])
        model.method.config.supervise_tags = False
        try:
            batch = model.collator()(records[:1])
        finally:
            model.method.config.supervise_tags = True
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        assert torch.equal(ids, default["input_ids"][0])
        assert model.tokenizer.decode(ids[labels != -100]) == expected[stage]
        c = model.method.config
        dropped = (default["labels"][0] != -100) & (labels == -100)  # exactly the tags lose their labels
        tags = {c.observation_start_id, c.observation_end_id, c.latent_end_id}
        assert set(ids[dropped].tolist()) <= tags and dropped.sum() == sum(int(i in tags) for i in ids.tolist())
        assert torch.equal(labels[labels != -100], ids[labels != -100])


def image_runs(ids, image_token_id):
    """Positions of each image's pad tokens, one list per image."""
    runs = []
    for p in (ids == image_token_id).nonzero().flatten().tolist():
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def test_stage2_mask_rules(stage2, records):
    batch = stage2.collator()(records)
    c = stage2.method.config
    allowed = stage2_allowed(batch["input_ids"], batch["attention_mask"], image_token_id=stage2.backbone.image_token_id,
                             latent_start_id=c.latent_start_id, latent_pad_id=c.latent_pad_id)
    causal = torch.ones(allowed.shape[1:], dtype=torch.bool).tril()
    assert not (allowed & ~causal).any()
    for r in range(len(records)):
        ids = batch["input_ids"][r]
        valid = batch["attention_mask"][r].bool()
        assert not allowed[r][:, ~valid].any()
        runs = image_runs(ids, stage2.backbone.image_token_id)
        starts = (ids == c.latent_start_id).nonzero().flatten().tolist()
        question = [run for run in runs if run[-1] + 2 not in starts]
        aux = [run for run in runs if run[-1] + 2 in starts]
        assert len(aux) == len(starts) == batch["num_latent_segments"][r]
        later = torch.arange(len(ids))
        for run in question:  # visible to every later real token
            assert allowed[r][(later > run[-1]) & valid][:, run].all()
        for run in aux:
            run_t = torch.tensor(run)
            pads = list(range(run[-1] + 3, run[-1] + 3 + K))
            assert (ids[pads] == c.latent_pad_id).all()
            assert allowed[r][pads][:, run].all()  # the segment's latents see the whole image
            assert allowed[r][run_t[:, None], run_t].equal(causal[: len(run), : len(run)])  # image tokens: causal
            others = (later > run[-1]) & valid
            others[pads] = False
            assert others.sum() > 0 and not allowed[r][others][:, run].any()  # nobody else after the image sees it


def test_stage2_mask_hides_the_aux_image_except_through_the_latents(stage2, records):
    """Perturb the auxiliary image's pixels, latent vectors fixed. Under the stage-2 mask (as the decoder applies it)
    the tokens between the image and the latents do not change, the latent positions do, and once the latent rows are
    cut off from the image too, nothing after the image changes: every change after the segment went through the
    latent positions. Under the plain causal mask the image reaches the next token directly."""
    batch = stage2.collator()(records[:1])
    c = stage2.method.config
    n_question = int(batch["image_grid_thw"][0].prod())
    perturbed = batch["pixel_values"].clone()
    perturbed[n_question:] += torch.randn_like(perturbed[n_question:])
    slots = stage2.latent_slots(batch)
    z = torch.randn(slots[0].numel(), stage2.backbone.hidden_size)
    aux = image_runs(batch["input_ids"][0], stage2.backbone.image_token_id)[1]
    vision_end, start = aux[-1] + 1, aux[-1] + 2
    assert batch["input_ids"][0, start] == c.latent_start_id
    assert slots[1].tolist() == list(range(start + 1, start + 1 + K))

    def run(pixels, mask):
        b = {**batch, "pixel_values": pixels}
        with torch.no_grad():
            embeds = stage2.embed_inputs(b).index_put(slots, z)
            return stage2.backbone(embeds, stage2.position_ids(b), mask).last_hidden_state[0]

    def changed(mask):
        return (run(batch["pixel_values"], mask) - run(perturbed, mask)).abs().amax(-1) > 0

    mask = stage2.method.stage2_mask(stage2, batch, stage2.dtype)
    real = changed(mask)
    assert real[aux].all() and real[slots[1]].all()
    assert not real[: aux[0]].any() and not real[vision_end] and not real[start]
    allowed = stage2_allowed(batch["input_ids"], batch["attention_mask"], image_token_id=stage2.backbone.image_token_id,
                             latent_start_id=c.latent_start_id, latent_pad_id=c.latent_pad_id)
    allowed[0, slots[1][:, None], torch.tensor(aux)] = False
    cut = changed(additive_mask(allowed, stage2.dtype))
    assert cut[aux].all() and not cut[aux[-1] + 1:].any()
    assert changed(batch["attention_mask"])[vision_end]


def test_stage2_with_the_bottleneck_hides_the_question_from_all_after_the_first_start(stage2, records):
    """``latent_bottleneck`` in stage 2 (its mask ANDed with the stage-2 rule): the question picture perturbed, latent
    vectors fixed, on the record with two segments. Nothing after the first latent start changes but the later start
    tokens, the second auxiliary image included (it sits after that start); without the option the latents and the
    text after them change."""
    batch = stage2.collator()(records[1:2])
    c = stage2.method.config
    n_question = int(batch["image_grid_thw"][0].prod())
    perturbed = batch["pixel_values"].clone()
    perturbed[:n_question] += torch.randn_like(perturbed[:n_question])
    slots = stage2.latent_slots(batch)
    z = torch.randn(slots[0].numel(), stage2.backbone.hidden_size)
    ids = batch["input_ids"][0]
    starts = (ids == c.latent_start_id).nonzero().flatten().tolist()
    assert len(starts) == 2 and starts[1] > image_runs(ids, stage2.backbone.image_token_id)[2][0]

    def changed(model):
        mask = model.method.stage2_mask(model, batch, model.dtype)
        outs = []
        for pixels in (batch["pixel_values"], perturbed):
            b = {**batch, "pixel_values": pixels}
            with torch.no_grad():
                embeds = model.embed_inputs(b).index_put(slots, z)
                outs.append(model.backbone(embeds, model.position_ids(b), mask).last_hidden_state[0])
        return (outs[0] - outs[1]).abs().amax(-1) > 1e-5

    blind = copy.deepcopy(stage2)
    blind.method.config.latent_bottleneck = True
    after = torch.arange(len(ids)) > starts[0]
    cut = changed(blind)
    assert cut[starts[0]] and cut[starts[1]]  # the start tokens read the question
    after[starts[1]] = False
    assert not cut[after].any()
    assert changed(stage2)[after].all()


def test_a_stage2_batch_must_have_images_before_latents(stage2, stage3, records):
    with pytest.raises(ValueError, match="does not follow an auxiliary image"):
        stage2.method.stage2_mask(stage2, stage3.collator()(records[:1]), torch.float32)
    plain = InterleavedCollator(stage2.processor, latent_tokens=stage2.method.config.latent_tokens,
                                num_latent_tokens=K, latent_mode="image+latent")(records[:1])
    with pytest.raises(ValueError, match=r"no \['observation_mask', 'teacher'\]; collate with"):
        stage2(plain)


# -- losses and gradients -----------------------------------------------------------------------------


def test_stage1_weighted_ce(stage1, records):
    stage1.zero_grad()
    batch = stage1.collator()(records)
    out = stage1(batch)
    assert set(out.losses) == {"ce"} and torch.isfinite(out.loss)
    with torch.no_grad():
        hidden = stage1.run_language_model(stage1.embed_inputs(batch), batch).last_hidden_state
        logits = stage1.backbone.logits(hidden[:, :-1]).float()
        target = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none", ignore_index=-100)
        w = torch.where(batch["observation_mask"][:, 1:], 2.0, 1.0) * (target != -100)
        torch.testing.assert_close(out.loss, (ce * w).sum() / w.sum())
        assert not torch.allclose(out.loss, stage1.lm_loss(hidden, batch["labels"]))
    out.loss.backward()
    g = grads(stage1)
    assert any(".language_model.layers.0." in n for n in g) and "backbone.model.lm_head.weight" in g
    stage1.zero_grad()


def after_last_latent_only_rows(model, batch):
    """Token ids that occur in the batch only after the last latent segment of their row (observation text etc.)."""
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    end = model.method.config.latent_end_id
    before, after = set(), set()
    for r in range(ids.shape[0]):
        last = int((ids[r] == end).nonzero().max())
        before |= set(ids[r, : last + 1].tolist())
        after |= set(ids[r, last + 1:][valid[r, last + 1:]].tolist())
    return sorted(after - before)


def test_stage2_losses_and_latent_only_backprop(stage2, records):
    """The alignment's gradient equals the paper's surrogate stopgrad(dL/dz).z: it reaches the parameters only through
    the latent vectors, so e.g. the embedding rows of tokens that occur only after the latents get none."""
    model = stage2
    batch = model.collator()(records)
    model.zero_grad()
    out = model(batch)
    assert set(out.losses) == {"ce", "alignment"} and all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["alignment"] > 0
    torch.testing.assert_close(out.loss, out.losses["ce"] + 2.0 * out.losses["alignment"])
    teacher = model.method._teacher[0]
    assert not any(k.startswith("method.") for k in model.state_dict())  # the teacher is not part of the model
    out.losses["alignment"].backward()
    twin = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert all(p.grad is None for p in teacher.parameters())
    assert any(".language_model.layers.1." in n and g.abs().sum() > 0 for n, g in twin.items())
    rows = after_last_latent_only_rows(model, batch)
    emb = "backbone.model.model.language_model.embed_tokens.weight"
    assert len(rows) >= 5

    # reference: the paper's surrogate, built with autograd.grad on the filled latent slots
    model.zero_grad()
    m = model.method
    embeds, positions = model.embed_inputs(batch), model.position_ids(batch)
    mask = m.stage2_mask(model, batch, embeds.dtype)
    filled, _, (b, t) = model.fill_latents(embeds, batch, positions, mask)
    hs = model.backbone(filled, positions, mask, output_hidden_states=True).hidden_states
    teacher_states = m._teacher_observation_states(teacher, batch["teacher"])
    align = alignment_loss(torch.stack([h[batch["observation_mask"]] for h in hs]), teacher_states)
    g = torch.autograd.grad(align, filled, retain_graph=True)[0]
    slot = torch.zeros(filled.shape[:2], dtype=torch.bool)
    slot[b, t] = True
    (filled * (g * slot[..., None]).detach()).sum().backward()
    for n, p in model.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(twin.get(n, torch.zeros_like(p)), ref, atol=1e-6, rtol=1e-3, msg=n)

    # without latent-only backprop the same rows do get gradient from the alignment; with it, none (up to rounding)
    model.zero_grad()
    model.method.config.latent_only_backprop = False
    try:
        model(batch).losses["alignment"].backward()
        direct = model.get_parameter(emb).grad[rows].abs().max()
        assert direct > 0 and twin[emb][rows].abs().max() < 1e-5 * direct
    finally:
        model.method.config.latent_only_backprop = True
        model.zero_grad()


def test_stage3_losses_and_gradients(stage3, records):
    model = stage3
    batch = model.collator()(records)
    model.zero_grad()
    out = model(batch)
    assert set(out.losses) == {"ce", "alignment"} and all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["alignment"] > 0
    out.losses["alignment"].backward()
    g = grads(model)
    assert any(".language_model.layers.0." in n for n in g)
    assert all(p.grad is None for p in model.method._teacher[0].parameters())
    model.zero_grad()
    out = model(batch)
    out.losses["ce"].backward()
    assert "backbone.model.lm_head.weight" in grads(model)
    model.zero_grad()


def test_teacher_path_errors_and_checkpoint(stage1_ckpt, stage2, tmp_path, records):
    student = LatentVLM.from_pretrained(stage1_ckpt, stage=2)
    with pytest.raises(ValueError, match="monet stage 2 needs a teacher"):
        student(student.collator()(records[:1]))
    other_k = LatentVLM.from_pretrained(stage1_ckpt, num_latent_tokens=K + 1)
    student.method.set_teacher(other_k)  # a stage-1 teacher has no latents: any K
    with pytest.raises(ValueError, match="disagree on num_latent_tokens"):
        LatentVLM.from_pretrained(stage1_ckpt, stage=3).method.set_teacher(other_k)
    saved = stage2.save_pretrained(tmp_path / "s2")
    assert sorted(p.name for p in saved.glob("*.safetensors")) == ["model.safetensors"]
    reloaded = LatentVLM.from_pretrained(saved)
    assert reloaded.method.config == stage2.method.config and reloaded.method.config.teacher == str(stage1_ckpt)


# -- generation ---------------------------------------------------------------------------------------


def test_generation_with_monet_tokens(stage3):
    image = tiny_image(5)
    kwargs = dict(max_new_tokens=K + 6, prefix="Let me sketch it.<abs_vis_token>")
    gens = stage3.generate([image, None], ["Where next?", "Hello"], **kwargs)
    reference = stage3.generate([image, None], ["Where next?", "Hello"], use_cache=False, **kwargs)
    for g, ref in zip(gens, reference):
        assert g.latent_segments and g.latent_segments[0].k == K
        assert g.latent_segments[0].latents.shape == (K, stage3.backbone.hidden_size)
        torch.testing.assert_close(g.latent_segments[0].latents, ref.latent_segments[0].latents, atol=1e-4, rtol=1e-4)
        assert g.text.startswith(f"[latent x{K}]")


# -- learning -----------------------------------------------------------------------------------------


def overfit(model, batch, steps=10, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({k: round(float(v.detach()), 4) for k, v in out.losses.items()})
    model.eval()
    return history


def test_losses_go_down_when_overfitting_four_records(stage1_ckpt, records):
    """The three stages in a row on the same 4 records, each student starting from the untrained stage-1 checkpoint
    and each teacher being the previous stage just trained, plain AdamW: CE at least halves in every stage and the
    alignment to the teacher drops by at least a third."""
    torch.manual_seed(0)
    s1 = LatentVLM.from_pretrained(stage1_ckpt)
    h1 = overfit(s1, s1.collator()(records))
    assert h1[-1]["ce"] < 0.5 * h1[0]["ce"], h1

    s2 = LatentVLM.from_pretrained(stage1_ckpt, stage=2)
    s2.method.set_teacher(s1)
    h2 = overfit(s2, s2.collator()(records))
    assert h2[-1]["ce"] < 0.5 * h2[0]["ce"], h2
    assert h2[-1]["alignment"] < 0.67 * h2[0]["alignment"], h2

    s3 = LatentVLM.from_pretrained(stage1_ckpt, stage=3)
    s3.method.set_teacher(s2)
    h3 = overfit(s3, s3.collator()(records))
    assert h3[-1]["ce"] < 0.5 * h3[0]["ce"], h3
    assert h3[-1]["alignment"] < 0.67 * h3[0]["alignment"], h3


def test_alignment_is_one_minus_cosine_over_the_hidden_axis():
    """Inline formula on hand-sized tensors: for every layer and token, 1 - <s, t> / (|s| |t|) over the hidden axis,
    then the mean. Catches a cosine over the token axis (the released code's defect) or a sum instead of the mean."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    terms = [1 - float(student[l, n] @ teacher[l, n]) / float(student[l, n].norm() * teacher[l, n].norm())
             for l in range(2) for n in range(3)]
    torch.testing.assert_close(alignment_loss(student, teacher), torch.tensor(sum(terms) / len(terms)))
    # hand numbers: orthogonal -> 1, parallel -> 0, opposite -> 2; a scale does not matter
    s = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[0.0, 5.0], [1.0, 0.0], [0.0, -1.0]]])
    torch.testing.assert_close(alignment_loss(s, t), torch.tensor((1.0 + 0.0 + 2.0) / 3))


@pytest.mark.parametrize("centre", [False, True])
def test_stage3_pairs_the_i_th_student_slot_with_the_i_th_teacher_slot(stage3, records, centre):
    """Stage-3 alignment recomputed here: the student's latent-slot states (no images, recurrent latents) against
    the stage-2 teacher's at its own slots (images inline, stage-2 mask), slot i with slot i, all L + 1 states;
    ``centre_alignment``: both minus, per layer, the mean teacher state over the slots that are the j-th of their
    segment. Catches a shifted slot (the state before the slot), a reversed or unsorted pairing, a teacher run
    without its mask, a mean over the wrong axis or over every slot."""
    model, m = stage3, stage3.method
    teacher = m._teacher[0]
    batch = model.collator()(records)
    tb = batch["teacher"]
    pad = m.config.latent_pad_id
    m.config.centre_alignment = centre
    try:
        with torch.no_grad():
            got = model(batch).losses["alignment"]
    finally:
        m.config.centre_alignment = False
    with torch.no_grad():
        filled, _, _ = model.fill_latents(model.embed_inputs(batch), batch, model.position_ids(batch),
                                          batch["attention_mask"])
        hs = model.backbone(filled, model.position_ids(batch), batch["attention_mask"], output_hidden_states=True)
        t_embeds, t_pos = teacher.embed_inputs(tb), teacher.position_ids(tb)
        t_mask = m.stage2_mask(teacher, tb, t_embeds.dtype)
        t_filled, _, _ = teacher.fill_latents(t_embeds, tb, t_pos, t_mask)
        ths = teacher.backbone(t_filled, t_pos, t_mask, output_hidden_states=True)
    s_slots = [(r, p) for r in range(batch["input_ids"].shape[0])
               for p in range(batch["input_ids"].shape[1]) if batch["input_ids"][r, p] == pad]
    t_slots = [(r, p) for r in range(tb["input_ids"].shape[0]) for p in range(tb["input_ids"].shape[1])
               if tb["input_ids"][r, p] == pad]
    assert len(s_slots) == len(t_slots) == K * 5  # records a, b (two segments), c, d
    ids = tb["input_ids"]
    # each teacher slot's place in its segment: pads since the segment's start token
    place = [p - max(q for q in range(p) if ids[r, q] == m.config.latent_start_id) - 1 for r, p in t_slots]
    assert sorted(set(place)) == list(range(K))
    terms = []
    for l in range(len(hs.hidden_states)):
        student = [hs.hidden_states[l][r, p].float() for r, p in s_slots]
        target = [ths.hidden_states[l][r, p].float() for r, p in t_slots]
        if centre:
            means = [torch.stack([x for x, j in zip(target, place) if j == i]).mean(0) for i in range(K)]
            student = [x - means[j] for x, j in zip(student, place)]
            target = [x - means[j] for x, j in zip(target, place)]
        terms += [1 - torch.cosine_similarity(a, b, dim=0) for a, b in zip(student, target)]
    torch.testing.assert_close(got, torch.stack(terms).mean(), atol=1e-5, rtol=1e-4)


def test_stage2_alignment_recomputed_on_the_observation_tokens(stage2, records):
    """Stage-2 alignment value recomputed here: the student (auxiliary image, latents filled recurrently, stage-2 mask)
    and the stage-1 teacher (the image inline, no latents) at their observation tokens, i-th with i-th, over all L + 1
    states, 1 - cos over the hidden axis. Catches the twin pass changing the value, or observation tokens misaligned."""
    model, m = stage2, stage2.method
    batch = model.collator()(records)
    tb = batch["teacher"]
    with torch.no_grad():
        got = model(batch).losses["alignment"]
        teacher = m._teacher[0]  # loaded from its path by the first forward
        embeds, positions = model.embed_inputs(batch), model.position_ids(batch)
        mask = m.stage2_mask(model, batch, embeds.dtype)
        filled, _, _ = model.fill_latents(embeds, batch, positions, mask)
        hs = model.backbone(filled, positions, mask, output_hidden_states=True).hidden_states
        ths = teacher.run_language_model(teacher.embed_inputs(tb), tb, output_hidden_states=True).hidden_states
    obs = [(r, p) for r, p in batch["observation_mask"].nonzero().tolist()]
    t_obs = [(r, p) for r, p in tb["observation_mask"].nonzero().tolist()]
    assert len(obs) == len(t_obs) > 0
    for (r, p), (tr, tp) in zip(obs, t_obs):  # the same words on both sides
        assert batch["input_ids"][r, p] == tb["input_ids"][tr, tp]
    terms = [1 - torch.cosine_similarity(hs[l][r, p].float(), ths[l][tr, tp].float(), dim=0)
             for l in range(len(hs)) for (r, p), (tr, tp) in zip(obs, t_obs)]
    torch.testing.assert_close(got, torch.stack(terms).mean(), atol=1e-5, rtol=1e-4)
