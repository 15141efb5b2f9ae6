"""Every backbone family behind one adapter.

Per family: the adapter's embeddings + decoder equal the HF model's own forward (M-RoPE with interleaving, DeepStack,
Gemma 3's bidirectional image attention, LLaVA-OneVision's AnyRes packing), greedy text generation equals HF
``generate``, the vision features project back to the image embeddings, and labels cover the assistant turns only.
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
from vlatent.data.chat import encode_chat, render_prompt
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
