"""Every backbone family behind one adapter.

Per family: the adapter's embeddings + decoder equal the HF model's own forward (M-RoPE with interleaving, DeepStack,
Gemma 3's bidirectional image attention, LLaVA-OneVision's AnyRes packing), greedy text generation equals HF
``generate``, the vision features project back to the image embeddings, labels cover the assistant turns only, a Latent
Sketchpad sketch takes the positions the HF model gives a real image of its grid there, and the KV-cached sketches equal
a teacher-forced forward's (the training one, and VLPO's).
Per (family, method) pair of ``list_backbones() x list_methods()``: save/load round trip, KV-cached == recomputed
generation, a batch == its rows alone, one SFT step and one evaluation, on one tiny model per family.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoProcessor

from vlatent.backbones import backbone_class, backbone_for_processor, list_backbones
from vlatent.data import load_records
from vlatent.data.chat import encode_chat, encode_images, render_prompt
from vlatent.generation import LatentSegment
from vlatent.methods import list_methods
from vlatent.model import LatentVLM
from vlatent.testing import build_tiny_base, tiny_image

from test_generation import assert_same
from test_model import write_records

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the apps are not installed packages
from data_builders import maze  # noqa: E402
from eval.run import evaluate  # noqa: E402
from train.sft import main as sft  # noqa: E402

FAMILIES = list_backbones()
PAIRS = [(family, method) for family in FAMILIES for method in list_methods()]
WITH_VISUAL_CONTEXT = {"qwen3_vl", "gemma3"}  # families whose decoder needs more than the image embeddings
# small K and sizes: fast tests (method settings only: nothing here depends on the family)
METHOD_CONFIG = {"mirage": {"num_latent_tokens": 2}, "monet": {"num_latent_tokens": 2},
                 "sketchpad": {"sketch_size": 56, "head_heads": 4},
                 "perception": {"num_latent_tokens": 4, "codebook_size": 8, "box_bins": 8, "max_boxes": 2},
                 "cocova": {"num_latent_tokens": 2, "lq_hidden_size": 32, "lq_heads": 4, "lq_layers": 1,
                            "num_queries": 4, "num_iterations": 2, "num_selected": 8, "contrastive_dim": 16,
                            "recon_size": 16, "unet_channels": [16, 32], "unet_norm_groups": 8, "diffusion_steps": 100}}
IMAGES = [tiny_image(0, (56, 84)), tiny_image(1), None]
PROMPTS = ["What shape is this?", "Which way first?", "Hello there"]


@pytest.fixture(scope="session")
def family_base(tmp_path_factory):
    """family -> path of its tiny base checkpoint, each built once per session."""
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(family):
        if family not in built:
            built[family] = build_tiny_base(root / family, family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def method_config(tmp_path_factory):
    """method -> its tiny config; perception gets an (untrained) 4-code depth tokenizer of its own format."""
    from vlatent.decoders import DepthTokenizer
    from vlatent.decoders.depth import DepthTokenizerConfig

    tokenizer = DepthTokenizer(DepthTokenizerConfig(image_size=8, codebook_size=8, block_out_channels=(8, 8, 8),
                                                    latent_channels=4))
    path = tokenizer.save_pretrained(tmp_path_factory.mktemp("depth") / "tokenizer")
    configs = {**METHOD_CONFIG, "perception": {**METHOD_CONFIG["perception"], "tokenizer": str(path)}}
    return lambda method: configs.get(method, {})


@pytest.fixture(scope="session")
def pair_model(family_base, method_config):
    """(family, method) -> a LatentVLM in eval mode, loaded once per session (tests must not change its weights)."""
    loaded = {}

    def get(family, method):
        if (family, method) not in loaded:
            torch.manual_seed(0)
            loaded[family, method] = LatentVLM.from_pretrained(family_base(family), method=method,
                                                               **method_config(method)).eval()
        return loaded[family, method]

    return get


@pytest.fixture(scope="session")
def records(tmp_path_factory):
    return load_records(write_records(tmp_path_factory.mktemp("records"), [("a", 1, True), ("b", 2, True),
                                                                           ("c", 1, False)]))


@pytest.fixture(scope="session")
def maze_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("maze") / "data"
    assert maze.main(["--out", str(out), "--n", "6", "--size", "3", "--split", "0,0,1", "--seed", "0"]) == 0
    return out


def prefixes(model):
    """Row 1 starts in latent mode (a random model would rarely open a segment itself)."""
    start = model.method.config.latent_start_token
    return ["", "Let me think." + start, "Go"] if model.method.uses_latents else None


# -- each adapter against its own HF model -----------------------------------------------------------------------
def hf_and_ours(family_base, family, images):
    """One prompt through the HF model's own forward and through the adapter: (reference, ours, ours without the
    VisualContext), last hidden states (1, seq, hidden)."""
    base = family_base(family)
    cls = backbone_class(family)
    hf = cls.model_class.from_pretrained(base).eval()
    backbone, processor = cls(hf), AutoProcessor.from_pretrained(base)
    text = render_prompt(processor, "Compare the pictures.", len(images))
    raw = processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
    enc = encode_chat(processor, text, images)
    ids = torch.tensor([enc["input_ids"]])
    assert torch.equal(ids, raw["input_ids"])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = hf.model(**raw).last_hidden_state
        embeds, visual = backbone.embed_multimodal(ids, enc["pixel_values"], enc["image_grid_thw"])
        positions = backbone.position_ids(ids, torch.tensor([enc["mm_token_type_ids"]]), enc["image_grid_thw"], mask)
        ours = backbone(embeds, positions, mask, visual=visual).last_hidden_state
        blind = backbone(embeds, positions, mask).last_hidden_state
    return reference, ours, blind


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_equals_the_hf_model(family_base, family, n_images):
    reference, ours, blind = hf_and_ours(family_base, family, IMAGES[:n_images])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    if family in WITH_VISUAL_CONTEXT:  # DeepStack / the image blocks reach the decoder only through VisualContext
        assert (blind - reference).abs().amax() > 1e-3
    else:
        torch.testing.assert_close(blind, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_passes_over_the_cache_equal_one_pass(pair_model, records, family):
    """``VisualContext.window``: DeepStack features and image blocks land on the right positions when a sequence runs
    in chunks over the KV cache (as ``fill_latents`` runs it): here the image lies in a chunk after cached ones."""
    from transformers import DynamicCache

    model = pair_model(family, "mirage")
    batch = model.collator()(records)
    with torch.no_grad():
        embeds, positions = model.embed_inputs(batch), model.position_ids(batch)
        whole = model.run_language_model(embeds, batch).last_hidden_state
        image = batch["mm_token_type_ids"][0].nonzero().flatten()
        cuts = [0, int(image[0]) - 1, int(image[-1]) + 3, embeds.shape[1]]
        cache, parts = DynamicCache(config=model.config.get_text_config()), []
        for start, end in zip(cuts, cuts[1:]):
            mask = batch["attention_mask"][:, :end]
            parts.append(model.backbone(embeds[:, start:end], positions[..., start:end], mask, past_key_values=cache,
                                        use_cache=True, visual=batch["visual_context"]).last_hidden_state)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(torch.cat(parts, dim=1)[real], whole[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_text_generation_equals_hf_generate(pair_model, family):
    """Per-step position ids (interleaved M-RoPE for Qwen3-VL, 1-D for LLaVA-OV / Gemma 3) as HF advances them."""
    model = pair_model(family, "text")
    images = IMAGES[:2]
    ours = model.generate([images], ["Compare the pictures."], max_new_tokens=8)[0]
    text = render_prompt(model.processor, "Compare the pictures.", 2)
    raw = model.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.backbone.model.generate(**raw, max_new_tokens=ours.num_steps, do_sample=False)
    theirs = out[0, raw["input_ids"].shape[1]:].tolist()
    assert [t for s in ours.segments for t in s.token_ids] == theirs[:len(theirs) - (ours.finish_reason == "eos")]


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_features_project_to_the_image_embeddings(pair_model, family):
    backbone, processor = pair_model(family, "text").backbone, pair_model(family, "text").processor
    enc = encode_chat(processor, render_prompt(processor, "Hi", 2), IMAGES[:2])
    with torch.no_grad():
        features = backbone.vision_features(enc["pixel_values"], enc["image_grid_thw"])
        embeddings = backbone.encode_images(enc["pixel_values"], enc["image_grid_thw"])
        per_token = backbone.vision_features_per_token
        for f, e in zip(features, embeddings, strict=True):
            assert f.shape[1] == backbone.vision_feature_size and f.shape[0] % per_token == 0
            projected = backbone.project_vision_features(f)
            assert projected.shape == (f.shape[0] // per_token, backbone.hidden_size)
            # LLaVA-OV: the base view's tokens come first; its AnyRes crops and newline tokens follow
            n = e.shape[0] if family != "llava_onevision" else projected.shape[0]
            torch.testing.assert_close(projected, e[:n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_heat_map_grid_is_the_familys_own_token_layout(pair_model, family):
    from vlatent.decoders.inspect import image_patch_features, inspect_latents

    model = pair_model(family, "mirage")
    patches = image_patch_features(model, IMAGES[0])
    rows, cols = patches.grid
    assert patches.features.shape == (rows * cols, model.backbone.hidden_size) and rows > 1 and cols > 1
    # a latent equal to a patch peaks on that patch, at its row and column: patch `cols` opens row 1 (a transposed or
    # column-major grid puts it in row 0), patch `cols + 1` is the second of row 1
    picked = [cols, cols + 1]
    view = inspect_latents(model, patches.features[picked], patches)
    assert view.overlays and len(view.overlays) == 2 and view.similarity.shape == (2, rows, cols)
    for sim, (r, c) in zip(view.similarity, [(1, 0), (1, 1)]):
        assert torch.isclose(sim[r, c], sim.max()), (family, (r, c), divmod(int(sim.argmax()), cols))


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_the_assistant_turns_only(pair_model, records, family):
    model = pair_model(family, "mirage")
    fmt = backbone_for_processor(model.processor).chat_format
    batch = model.collator()(records[:1])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    supervised = model.tokenizer.decode(labels[labels != -100])
    assert supervised.startswith("Let me sketch it.") and supervised.endswith(fmt.turn_end)
    assert "Where next?" not in supervised and supervised.count(fmt.turn_end) == 1
    image_positions = batch["mm_token_type_ids"][0].bool()
    assert image_positions.any() and (labels[image_positions] == -100).all()
    assert torch.equal(image_positions, ids == model.backbone.image_token_id)


@pytest.mark.parametrize("family", ["llava_onevision", "gemma3"])
def test_pixel_bounds_of_a_fixed_resolution_family_are_a_clear_error(pair_model, family):
    with pytest.raises(ValueError, match="resizes every image to"):
        pair_model(family, "text").collator(max_pixels=64 * 64)


# -- Latent Sketchpad: sketch slots sit where the family puts an image's tokens -------------------------------------
@pytest.fixture(scope="session")
def sketch_model(family_base):
    """family -> a sketchpad LatentVLM whose sketch is a 3 x 3 token grid on the Qwen families (so that its image
    positions differ from text ones on every axis; 56 px elsewhere), loaded once per session."""
    loaded = {}

    def get(family):
        if family not in loaded:
            v = backbone_class(family).model_class.config_class.from_pretrained(family_base(family)).vision_config
            size = 3 * v.spatial_merge_size * v.patch_size if hasattr(v, "spatial_merge_size") else 56
            torch.manual_seed(0)
            loaded[family] = LatentVLM.from_pretrained(family_base(family), method="sketchpad", sketch_size=size,
                                                       head_heads=4).eval()
        return loaded[family]

    return get


def hf_position_ids(hf, inputs) -> torch.Tensor:
    """The position ids the HF model's own forward gives its rotary embedding: (3, 1, seq) on M-RoPE, (1, seq) 1-D."""
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs["position_ids"] if "position_ids" in kwargs else args[1])

    hook = hf.model.language_model.rotary_emb.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        hf(**inputs)
    hook.remove()
    return seen[0].expand(-1, -1, -1)[-3:] if seen[0].dim() == 3 else seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_sketch_positions_are_the_hf_models_image_positions(sketch_model, family):
    """A sketch's slots get the positions the HF model itself gives a real sketch-sized image at that place (after a
    real non-square image), and the text after it continues where the model continues after that image."""
    model = sketch_model(family)
    proc, c = model.processor, model.method.config
    kwargs = type(model.backbone).fixed_size_images_kwargs(proc, c.sketch_size)
    images = [tiny_image(0, (56, 84)), tiny_image(1, (c.sketch_size, c.sketch_size))]
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First this."},
                                         {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    text = render_prompt(proc, turn, len(images))
    raw = proc(text=[text], images=[images], images_kwargs=kwargs, add_special_tokens=False, return_tensors="pt")
    reference = hf_position_ids(model.backbone.model, raw)  # (3, 1, L) or (1, L)
    ids = raw["input_ids"]  # (1, L)
    runs = (ids[0] == model.backbone.image_token_id).nonzero().flatten()
    a = int(runs[runs.diff(prepend=runs[:1] - 2) > 1][1])  # the sketch-sized image's first token
    n, k = int((runs >= a).sum()), c.num_latent_tokens  # its tokens, a sketch's
    # ours: the same sequence, the second image's n tokens replaced by one sketch's K latent slots
    ours_ids = torch.cat([ids[:, :a], torch.full((1, k), c.latent_pad_id), ids[:, a + n:]], dim=1)
    batch = {"input_ids": ours_ids, "attention_mask": torch.ones_like(ours_ids),
             "mm_token_type_ids": (ours_ids == model.backbone.image_token_id).long(),
             "image_grid_thw": encode_images(proc, images[:1], kwargs)[1]}  # the first image's only
    ours = model.position_ids(batch)
    assert n >= k and (n == k or family == "llava_onevision")  # LLaVA-OV: a sketch is the base view, no newline token
    assert torch.equal(ours[..., :a + k], reference[..., :a + k])  # prompt, first image, the sketch's slots
    after = ours[..., a + k:] - ours[..., a:a + k].max()
    assert torch.equal(after, reference[..., a + n:] - reference[..., a:a + n].max())  # then the text continues alike
    if n == k:
        assert torch.equal(ours, reference)
    text_only = model.backbone.position_ids(ours_ids, batch["mm_token_type_ids"], batch["image_grid_thw"],
                                            batch["attention_mask"])
    assert torch.equal(ours, text_only) == (family in ("llava_onevision", "gemma3"))  # 1-D: image == text positions


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_sketches_equal_a_teacher_forced_forward(sketch_model, family, monkeypatch):
    """Train == generate: the sketch latents the KV-cached decode loop feeds equal the ones the training forward
    (``model.position_ids``, the vision head over the states before each slot) makes over the generated sequence:
    two sketches per answer, with or without an image before them."""
    from vlatent.generation import encode_prompts, normalize_inputs

    model = sketch_model(family)
    method, c = model.method, model.method.config
    k = c.num_latent_tokens

    def open_sketches(logits, state):  # steer the untrained model: every text step opens a new sketch
        forced = torch.full_like(logits, float("-inf"))
        forced[:, c.latent_start_id] = 0.0
        return forced

    monkeypatch.setattr(method, "constrain_logits", open_sketches)
    images, prompts, prefixes = normalize_inputs([tiny_image(0, (56, 84)), None], ["Draw it.", "Draw it again."],
                                                 c.latent_start_token)
    gens = model.generate(images, prompts, max_new_tokens=2 * k + 3, prefix=prefixes)
    assert [len(g.latent_segments) for g in gens] == [2, 2]
    prompt = encode_prompts(model, images, prompts, prefixes)
    width = max(len(g.token_ids) for g in gens)
    done = torch.tensor([g.token_ids + [model.tokenizer.pad_token_id] * (width - len(g.token_ids)) for g in gens])
    inside = torch.tensor([[1] * len(g.token_ids) + [0] * (width - len(g.token_ids)) for g in gens])
    batch = {**prompt, "input_ids": torch.cat([prompt["input_ids"], done], 1),
             "attention_mask": torch.cat([prompt["attention_mask"], inside], 1),
             "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(done)], 1)}
    latents = torch.cat([s.latents for g in gens for s in g.latent_segments])  # (4 K, hidden), row-major
    features = [s.features for g in gens for s in g.latent_segments]  # per sketch: (K * per, d_v)
    with torch.no_grad():
        b, t = model.latent_slots(batch)
        embeds = model.embed_inputs(batch).index_put((b, t), latents)
        hidden = model.run_language_model(embeds, batch).last_hidden_state  # (2, seq, hidden)
        images_vit = model.backbone.vision_features(batch["pixel_values"], batch["image_grid_thw"])
        images_vit = [(f, method.image_coords(model.backbone, g, f))
                      for f, g in zip(images_vit, batch["image_grid_thw"])]
        context = method.global_context(batch, b, t, features, images_vit, model.backbone.image_token_id)
        predicted = method.head(hidden[b, t - 1].view(-1, k, hidden.shape[-1]), *context)  # (4, K * per, d_v)
        forced = model.backbone.project_vision_features(predicted.flatten(0, 1))  # (4 K, hidden)
    torch.testing.assert_close(predicted, torch.stack(features), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(forced, latents, atol=1e-4, rtol=1e-4)
    # VLPO's teacher-forced forward places the sketches as well: its means are the latents fed (a small sigma makes
    # any shift of the means show: moving the sketches back to text positions costs up to 0.15 nats on Qwen2.5-VL)
    from vlatent.training.vlpo import action_log_probs, build_rollouts, gaussian_log_prob

    r = build_rollouts(model, images, prompts, prefixes, gens, torch.zeros(2), ["a", "b"])
    with torch.no_grad():
        lp = action_log_probs(model, r, temperature=1.0, sigma=1e-3, score_latents=True)
    torch.testing.assert_close(lp[r.latent_mask], gaussian_log_prob(latents, latents, 1e-3), atol=1e-2, rtol=0)


# -- the core checks for every (family, method) pair ---------------------------------------------------------------
@pytest.mark.parametrize("family, method", PAIRS)
def test_round_trip(pair_model, records, tmp_path, family, method):
    model = pair_model(family, method)
    loaded = LatentVLM.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert loaded.backbone.family == family and loaded.method.name == method
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    batch = model.collator()(records)
    with torch.no_grad():
        a = model.run_language_model(model.embed_inputs(batch), batch).last_hidden_state
        b = loaded.run_language_model(loaded.embed_inputs(batch), batch).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("family, method", PAIRS)
def test_cache_matches_recompute(pair_model, family, method):
    model = pair_model(family, method)
    kw = dict(max_new_tokens=10, prefix=prefixes(model))
    cached = model.generate(IMAGES, PROMPTS, use_cache=True, **kw)
    recomputed = model.generate(IMAGES, PROMPTS, use_cache=False, **kw)
    if model.method.uses_latents:
        assert isinstance(cached[1].segments[0], LatentSegment)
    for a, b in zip(cached, recomputed, strict=True):
        assert_same(a, b, atol=1e-4)


@pytest.mark.parametrize("family, method", PAIRS)
def test_batch_matches_rows_alone(pair_model, family, method):
    model = pair_model(family, method)
    pre = prefixes(model) or [None] * len(PROMPTS)
    batch = model.generate(IMAGES, PROMPTS, max_new_tokens=10, prefix=prefixes(model))
    for i, row in enumerate(batch):
        alone = model.generate([IMAGES[i]], [PROMPTS[i]], max_new_tokens=10,
                               prefix=None if pre[i] is None else [pre[i]])
        assert_same(row, alone[0], atol=1e-4)


@pytest.mark.parametrize("family, method", PAIRS)
def test_one_sft_step(family_base, method_config, records, family, method):
    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(family_base(family), method=method, **method_config(method))
    batch = model.collator()(records)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    out = model(batch)
    assert out.losses and math.isfinite(out.loss.item())
    out.loss.backward()
    lm = model.backbone.parts()["language_model"][0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("backbone.") for n in changed)


@pytest.mark.parametrize("family, method", PAIRS)
def test_one_eval(pair_model, maze_data, tmp_path, family, method):
    model = pair_model(family, method)
    uses = model.method.uses_latents  # latent methods start in latent mode, so every family runs a latent segment
    scores = evaluate(model, "maze", maze_data, tmp_path / "eval", batch_size=2, max_new_tokens=6, limit=3,
                      latent="on" if uses else "auto", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert scores["num"] == 3 and len(rows) == 3 and all(r["error"] is None for r in rows)
    assert all(r["latent_tokens"] > 0 for r in rows) == uses


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_entry_point_runs_a_step(family_base, records, tmp_path, family):
    """``train/sft.py`` (Trainer, freezing the named parts, saving) on each family: one step, a loadable checkpoint."""
    train = write_records(tmp_path / "data", [("a", 1, True), ("b", 1, False)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(family_base(family)), "method": "mirage", "method_config": {"num_latent_tokens": 2},
        "data": {"train": str(train), "max_length": 512}, "freeze_vision_tower": True,
        "training": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "max_steps": 1,
                     "learning_rate": 1e-3, "logging_steps": 1, "seed": 0, "disable_tqdm": True,
                     "save_strategy": "no", "report_to": []}}))
    assert sft(["--config", str(recipe)]) == 0
    trained = LatentVLM.from_pretrained(tmp_path / "out")
    assert trained.backbone.family == family and trained.method.config.num_latent_tokens == 2
