"""vlatent.testing builds real, reloadable tiny Qwen2.5-VL checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from vlatent.testing import MARKER, SPECIAL_TOKENS, build_tiny_base, build_tiny_model, tiny_image

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which way is the exit?"}]}]
RENDERED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which way is the exit?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


def test_build_writes_a_real_checkpoint(tiny_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (tiny_dir / name).is_file(), name
    config = AutoConfig.from_pretrained(tiny_dir)
    text, vision = config.text_config, config.vision_config
    assert (config.model_type, text.hidden_size, text.num_hidden_layers, vision.depth) == ("qwen2_5_vl", 64, 2, 2)
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert vision.out_hidden_size == text.hidden_size and not config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert text.vocab_size % 64 == 0 and 0 <= text.vocab_size - len(tokenizer) < 64
    ids = tokenizer.convert_tokens_to_ids
    assert (config.image_token_id, config.video_token_id) == (ids("<|image_pad|>"), ids("<|video_pad|>"))
    assert [config.vision_start_token_id, config.vision_end_token_id] == ids(["<|vision_start|>", "<|vision_end|>"])
    assert (text.eos_token_id, text.pad_token_id) == (ids("<|im_end|>"), ids("<|endoftext|>"))
    assert all(t.dtype == torch.float32 for t in load_file(tiny_dir / "model.safetensors").values())


def test_cache_hit_does_not_rewrite(tiny_dir):
    """A cache hit writes nothing: every file and the folder itself keep their modification times (no file written,
    added, or created and removed again)."""
    mtimes = {p: p.stat().st_mtime_ns for p in [tiny_dir, *tiny_dir.iterdir()]}
    assert build_tiny_base(tiny_dir) == tiny_dir
    assert build_tiny_model(tiny_dir, method=None) == tiny_dir
    assert {p: p.stat().st_mtime_ns for p in [tiny_dir, *tiny_dir.iterdir()]} == mtimes


def test_same_seed_same_weights_and_new_args_rebuild(tiny_dir, tmp_path):
    base = load_file(tiny_dir / "model.safetensors")
    assert all(torch.equal(base[k], v) for k, v in load_file(build_tiny_base(tmp_path) / "model.safetensors").items())
    build_tiny_base(tmp_path, seed=1, hidden_size=128, vision_depth=3, max_pixels=56 * 56)
    assert json.loads((tmp_path / MARKER).read_text())["overrides"]["vision_depth"] == 3
    weights = load_file(tmp_path / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"][:, :64], base["lm_head.weight"])
    config = AutoConfig.from_pretrained(tmp_path)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, vision.depth, vision.out_hidden_size) == (128, 3, 128)
    assert sum(text.rope_parameters["mrope_section"]) == 16
    assert AutoProcessor.from_pretrained(tmp_path).image_processor.size["longest_edge"] == 56 * 56


def test_reload_gives_identical_logits_with_an_image(tiny_dir, processor):
    inputs = processor(text=[RENDERED], images=[tiny_image(size=(84, 112))], return_tensors="pt")
    with torch.random.fork_rng():  # the builder's in-memory model, recreated from the saved config and seed
        torch.manual_seed(0)
        fresh = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(tiny_dir)).eval()
    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        logits = loaded.eval()(**inputs).logits
        assert torch.equal(logits, fresh(**inputs).logits)
    assert logits.shape == (*inputs["input_ids"].shape, loaded.config.text_config.vocab_size)


def test_processor_expands_image_pads(processor):
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == RENDERED
    images = [tiny_image(0), tiny_image(1, size=(112, 84))]
    inputs = processor(text=[RENDERED, RENDERED], images=images, padding=True, return_tensors="pt")
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(inputs)
    n_pads = (inputs["input_ids"] == processor.image_token_id).sum(1)
    assert n_pads.tolist() == (inputs["image_grid_thw"].prod(1) // 4).tolist() == [4, 12]
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == processor.image_token_id)


def test_chat_template_text_only_and_system(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go left or right?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGo left or right?<|im_end|>\n"


def test_tokenizer_round_trip(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    for text in ("The answer is C.", "  Move up,\tthen LEFT!\n\n(42) ~`@#$%^&*[]{}|\\;:'\"<>/?", "zqxj unseen words"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    special_ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert special_ids == list(range(len(tokenizer) - len(SPECIAL_TOKENS), len(tokenizer)))  # after the BPE, as in Qwen
    text = "".join(f"{t}word {i} " for i, t in enumerate(SPECIAL_TOKENS))
    ids = tokenizer.encode(text)
    assert [i for i in ids if i in special_ids] == special_ids
    assert tokenizer.decode(ids) == text


def test_unknown_family_and_tiny_image():
    with pytest.raises(ValueError, match="llava_next.*qwen2_5_vl"):
        build_tiny_base("/nonexistent", family="llava_next")
    image = tiny_image(3, size=(70, 42))
    assert image.mode == "RGB" and image.size == (70, 42) and len(set(image.getdata())) > 3
    assert image.tobytes() == tiny_image(3, size=(70, 42)).tobytes() != tiny_image(4, size=(70, 42)).tobytes()
