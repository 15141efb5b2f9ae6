"""Tiny, real HuggingFace checkpoints for tests and demos.

Each builder writes a genuine model + processor with tiny configs and random weights via `save_pretrained`,
so the rest of vlatent loads it with `from_pretrained` exactly as it would load e.g. Qwen/Qwen2.5-VL-7B-Instruct.
Everything is built offline in a few seconds: the tokenizer is a byte-level BPE trained on `CORPUS` below (Gemma 3:
a byte-fallback BPE in Gemma's layout), with each family's real tokenizer, processor classes and chat template.
"""

from __future__ import annotations

import dataclasses
import json
import random
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLTextConfig,
    Qwen2Config,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLTextConfig,
    Qwen3VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

MARKER = "vlatent_tiny.json"

CORPUS = """\
The red square is to the left of the blue circle. The green triangle is above the yellow star.
A small purple hexagon sits below a large orange rectangle. Which shape is closest to the top right corner?
The answer is A. The answer is B. The answer is C. The answer is D. The correct option is (B).
Options: (A) red (B) green (C) blue (D) yellow. Answer with the letter of the correct option.
Look at the image and count the circles. There are 3 circles, 2 squares and 1 triangle, so 6 shapes in total.
The maze has a start cell marked S and a goal cell marked G. Walls are black and open paths are white.
From the start, move up, then right, right, down, left and finally down again to reach the goal.
Directions: up, down, left, right. The path goes left, left, up, up, right. Is the path valid? Yes. No.
Go up 2 steps, turn right, go down 3 steps, then turn left. You cannot walk through a wall.
The agent is at row 4, column 7. The exit is at row 0, column 9. How many moves are needed? 11 moves.
Numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024.
Colours: red, green, blue, yellow, orange, purple, pink, brown, black, white, grey, cyan, magenta.
Shapes: circle, square, triangle, rectangle, star, hexagon, pentagon, diamond, oval, line, arrow, cube.
The blue cube is on top of the red cube. If we remove the red cube, the blue cube falls down.
Imagine rotating the figure by 90 degrees clockwise. Which of the four options matches the result?
The left piece fits into the right hole. The top half is darker than the bottom half.
Think step by step. First, find the red object. Second, check what lies to its right. Third, answer.
Let me think about this visually. I will sketch the path and then trace it with my finger.
The image shows a kitchen table with two cups, a plate and three apples. The cup on the left is empty.
Q: What colour is the largest shape? A: The largest shape is green. Q: Where is the star? A: Bottom left.
The distance from A to B is 5 units, and from B to C is 12 units, so the total distance is 17 units.
If the ball rolls to the right and hits the wall, it bounces back to the left. The ball stops at cell 3.
Picture 1 shows a dog. Picture 2 shows a cat. Video 1 shows a car driving down the road at night.
You are a helpful assistant. The user asks a question about the picture and the assistant answers it.
system user assistant: Describe the picture in one sentence. The picture contains a bright yellow sun.
Please describe the scene. There is a tall tree next to a small house, and a path leads to the door.
Find the shortest route through the grid. Cells with an X are blocked. The route is: down, down, right.
Is the triangle inside the circle? Yes, the triangle is fully inside the circle and touches its edge.
Compare the two images. In the first image the square is red; in the second image it has turned blue.
The clock shows 3:45. The hands point to the three and the nine. Half past four would be 4:30.
The box is 12 cm wide, 8 cm tall and 4 cm deep. Its volume is 384 cubic centimetres.
"What is in the box?" she asked. "A red ball and a blue block," he said. It's not heavy, isn't it?
Step 1: locate the start. Step 2: follow the corridor. Step 3: avoid the dead end. Step 4: reach the exit.
The arrow points north-east. North, south, east and west are the four main directions on a map.
Final answer: C. Final answer: 42. Final answer: left. Final answer: yes. Final answer: the blue circle.
Spatial words: above, below, beside, between, behind, in front of, inside, outside, near, far, around.
The checkerboard alternates black and white tiles; the knight jumps two squares forward and one sideways.
Fold the paper along the dotted line. After unfolding, the holes appear symmetric about the middle crease.
A jigsaw puzzle has 24 pieces: 4 corners, 12 edges and 8 interior pieces. Which piece is missing?
Mirror the drawing horizontally. The flag waves eastward, so the wind blows from the west.
Traffic lights change from green to amber to red. The pedestrian waits until the signal shows walk.
Stack the blocks from largest to smallest: the bottom block is widest, the highest block is narrowest.
Robots navigate warehouses using cameras, while drones survey fields and rivers from high altitude.
Reasoning chains: observe, hypothesise, verify, conclude. Latent tokens carry visual thoughts quietly.
Quickly jump over lazy foxes; zebras vex, pack my box with five dozen liquor jugs. Wow, quiz time!
Bright pixels, blurry edges, sharp corners, smooth gradients, noisy textures, striped and dotted patterns.
"""

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# Qwen2-VL / Qwen2.5-VL's official chat template (chat_template.json of the Instruct checkpoints).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Qwen3-VL Instruct's chat template, reduced to what vlatent renders (no tools, no thinking, no video timestamps) and,
# like Qwen2.5-VL's, showing images in every turn (the official one drops images from assistant turns).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-OneVision (Qwen2 LM) ChatML with ``<image>`` placeholders, kept in content order (the official template moves a
# message's images before its text, which would pull an inline helper image out of its place in an interleaved turn).
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'video' %}<video>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma 3 (-it)'s official chat template: bos, system text folded into the first user turn, the assistant as "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ first_user_prefix if loop.first else '' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, as in Gemma's vocabulary
GEMMA_CONTROL_TOKENS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


@lru_cache(maxsize=1)
def _train_bpe() -> Tokenizer:
    """1000-token byte-level BPE with Qwen2's pre-tokenizer trained on CORPUS; special tokens get the ids after it."""
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _qwen_tokenizer(chat_template: str = QWEN2_VL_CHAT_TEMPLATE, extra: tuple[str, ...] = ()) -> Qwen2Tokenizer:
    """A real `Qwen2Tokenizer` over the local BPE; like Qwen's: eos `<|im_end|>`, pad `<|endoftext|>`, no bos/unk.
    ``extra``: more special tokens after Qwen's (LLaVA-OneVision's ``<image>``, ``<video>``)."""
    bpe = _train_bpe()
    if extra:
        bpe = Tokenizer.from_str(bpe.to_str())
        bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    return Qwen2Tokenizer(
        tokenizer_object=bpe,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS + list(extra),
        chat_template=chat_template,
    )


@lru_cache(maxsize=1)
def _train_gemma_bpe() -> Tokenizer:
    """BPE with byte fallback in Gemma's layout (spaces as "▁", no pre-tokenizer splits but on spaces), trained on
    CORPUS: Gemma's five special tokens, the 256 byte tokens, the merges, then Gemma 3's control tokens."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = BpeTrainer(vocab_size=1000, special_tokens=GEMMA_SPECIAL_TOKENS + byte_tokens, show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA_SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA_CONTROL_TOKENS])
    return tok


def _gemma_tokenizer() -> GemmaTokenizer:
    """A real `GemmaTokenizer` over the local BPE; like Gemma 3's: bos added, eos `<eos>`, pad `<pad>`, and the
    image tokens the processor reads (`boi_token`, `eoi_token`, `image_token`)."""
    return GemmaTokenizer(
        tokenizer_object=_train_gemma_bpe(),
        add_bos_token=True,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )


def _split_overrides(overrides: dict, text_fields=Qwen2_5_VLTextConfig.__dataclass_fields__) -> tuple[dict, ...]:
    """Route overrides to (text config, vision config, image processor, top-level config)."""
    text, vision, image, top = {}, {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key.removeprefix("vision_")] = value
        elif key in ("min_pixels", "max_pixels"):
            image[key] = value
        elif key in text_fields:
            text[key] = value
        else:
            top[key] = value
    return text, vision, image, top


def _build_qwen2_5_vl(out_dir: Path, seed: int, **overrides):
    """Qwen2_5_VLForConditionalGeneration (float32 safetensors) + Qwen2_5_VLProcessor, both via save_pretrained."""
    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_over, vision_over, image_over, top_over = _split_overrides(overrides)

    text = dict(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    text.update(text_over)
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size={text['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # mrope_section must sum to head_dim / 2
    mrope_section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # Qwen's [16, 24, 24] at head_dim 128
    text.setdefault("rope_parameters", {"rope_type": "default", "mrope_section": mrope_section})
    vision = dict(
        depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=text["hidden_size"], window_size=112, fullatt_block_indexes=[1],
    )  # fmt: skip
    vision.update(vision_over)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **top_over,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(out_dir)

    patches = dict(
        patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
        merge_size=vision["spatial_merge_size"], min_pixels=56 * 56, max_pixels=112 * 112,
    )  # fmt: skip
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**{**patches, **image_over}),
        tokenizer=tokenizer,
        # cap_pixels_per_frame: qwen-vl-utils' behaviour, and no deprecation warning on every video call
        video_processor=Qwen2VLVideoProcessor(**patches, cap_pixels_per_frame=True),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)


def _text_config(tokenizer, text_over: dict, **defaults) -> dict:
    """The tiny decoder shared by every family (64 wide, 2 layers), vocab rounded up to a multiple of 64."""
    text = dict(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **defaults)
    text.update(text_over)
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size={text['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return text


def _save(model_class, config, processor, out_dir: Path, seed: int, init=None) -> None:
    """Random float32 weights under ``seed`` (``init(model)`` adjusts them); model and processor via save_pretrained."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32)
        if init is not None:
            init(model)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _build_qwen3_vl(out_dir: Path, seed: int, **overrides):
    """Qwen3VLForConditionalGeneration (interleaved M-RoPE, DeepStack after LM layer 0) + Qwen3VLProcessor."""
    tokenizer = _qwen_tokenizer(QWEN3_VL_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_over, vision_over, image_over, top_over = _split_overrides(overrides, Qwen3VLTextConfig.__dataclass_fields__)
    text = _text_config(tokenizer, text_over, head_dim=16, bos_token_id=ids["<|endoftext|>"],
                        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    half = text["head_dim"] // 2  # mrope_section sums to head_dim / 2; Qwen3-VL's [24, 20, 20] at head_dim 128
    text.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_interleaved": True,
                                        "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]})
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    vision.update(vision_over)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False, **top_over)
    patches = dict(patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
                   merge_size=vision["spatial_merge_size"], image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = Qwen2VLImageProcessor(**patches, min_pixels=64 * 64, max_pixels=128 * 128, **image_over)
    video = Qwen3VLVideoProcessor(**patches, size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128})
    processor = Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                 chat_template=QWEN3_VL_CHAT_TEMPLATE)
    _save(Qwen3VLForConditionalGeneration, config, processor, out_dir, seed)


def _build_llava_onevision(out_dir: Path, seed: int, **overrides):
    """LlavaOnevisionForConditionalGeneration (SigLIP + 2-layer projector + Qwen2, anyres crops with newline tokens)
    + LlavaOnevisionProcessor. A 28 px base view (2x2 patches of 14 px); larger images add crops up to 56 px."""
    tokenizer = _qwen_tokenizer(LLAVA_ONEVISION_CHAT_TEMPLATE, extra=("<image>", "<video>"))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<image>", "<video>")}
    text_over, vision_over, image_over, top_over = _split_overrides(overrides, Qwen2Config.__dataclass_fields__)
    text = _text_config(tokenizer, text_over, model_type="qwen2", bos_token_id=ids["<|endoftext|>"],
                        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14)
    vision.update(vision_over)
    side = vision["image_size"]
    pinpoints = [[side * a, side * b] for a in (1, 2) for b in (1, 2)]
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                                  video_token_index=ids["<video>"], image_grid_pinpoints=pinpoints,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False, **top_over)
    size = {"height": side, "width": side}
    image = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3, **image_over)
    video = LlavaOnevisionVideoProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaOnevisionProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                        num_image_tokens=(side // vision["patch_size"]) ** 2,
                                        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
    _save(LlavaOnevisionForConditionalGeneration, config, processor, out_dir, seed)


def _build_gemma3(out_dir: Path, seed: int, **overrides):
    """Gemma3ForConditionalGeneration (SigLIP 56 px -> 4x4 patches, average-pooled to 2x2 = 4 soft tokens per image;
    alternating sliding / full attention; bidirectional attention among an image's tokens) + Gemma3Processor."""
    tokenizer = _gemma_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA_SPECIAL_TOKENS + GEMMA_CONTROL_TOKENS}
    text_over, vision_over, image_over, top_over = _split_overrides(overrides, Gemma3TextConfig.__dataclass_fields__)
    text = _text_config(tokenizer, text_over, head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
                        layer_types=["sliding_attention", "full_attention"], pad_token_id=ids["<pad>"],
                        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], bos_token_id=ids["<bos>"])
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56, patch_size=14, vision_use_head=False)
    vision.update(vision_over)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"], **top_over)
    image = Gemma3ImageProcessor(size={"height": vision["image_size"], "width": vision["image_size"]},
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3, **image_over)
    processor = Gemma3Processor(image_processor=image, tokenizer=tokenizer, image_seq_length=config.mm_tokens_per_image,
                                chat_template=GEMMA3_CHAT_TEMPLATE)
    def init(model):  # HF starts the soft-token projection at zero, which would make every image the same
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        torch.nn.init.normal_(projection, std=config.initializer_range)

    _save(Gemma3ForConditionalGeneration, config, processor, out_dir, seed, init)


# One small builder per family, keyed by the HF model_type.
BUILDERS = {"qwen2_5_vl": _build_qwen2_5_vl, "qwen3_vl": _build_qwen3_vl,
            "llava_onevision": _build_llava_onevision, "gemma3": _build_gemma3}


# The tiny base that sees (`vlatent pretrain-base`): wider and deeper than the unit tests' model, 112 px pictures as
# 4x4 merged tokens (one per cell of a 4x4 maze or lake). Built random here, then pretrained on perception captions.
SEEING_BASE = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vision_hidden_size": 64, "vision_intermediate_size": 128, "vision_depth": 4,
               "vision_num_heads": 4, "vision_fullatt_block_indexes": [1, 3]}


def build_tiny_base(out_dir, family: str = "qwen2_5_vl", seed: int = 0, **overrides) -> Path:
    """Write a tiny random-weight base VLM + processor into out_dir (cached by the `vlatent_tiny.json` marker).
    ``family``: the HF model_type, one of `BUILDERS` (qwen2_5_vl, qwen3_vl, llava_onevision, gemma3)."""
    if family not in BUILDERS:
        raise ValueError(f"Unknown tiny family {family!r}; supported: {sorted(BUILDERS)}")
    out_dir = Path(out_dir)
    marker = out_dir / MARKER
    args = json.loads(json.dumps({"family": family, "seed": seed, "overrides": overrides}))
    if marker.is_file() and json.loads(marker.read_text()) == args:
        return out_dir
    marker.unlink(missing_ok=True)  # a half-written rebuild must never look cached
    out_dir.mkdir(parents=True, exist_ok=True)
    BUILDERS[family](out_dir, seed, **overrides)
    marker.write_text(json.dumps(args, indent=2, sort_keys=True))
    return out_dir


SHIPPED_BASE = Path(__file__).parent / "assets" / "tiny_base"  # by `vlatent pretrain-base`: see its vlatent_base.json


def pretrained_base(out_dir=None) -> Path:
    """The tiny base that sees: the copy shipped with vlatent when present, else ``out_dir`` (default
    ``~/.cache/vlatent/tiny_base``), pretrained there on first use (`train/pretrain_base.py`, ~20 min on 2 cores)."""
    for path in (SHIPPED_BASE, Path(out_dir or Path.home() / ".cache" / "vlatent" / "tiny_base")):
        if (path / "vlatent_base.json").is_file() and (path / "model.safetensors").is_file():
            return path
    import subprocess
    import sys

    from .shipped import apps_root

    script = apps_root() / "train" / "pretrain_base.py"
    if not script.is_file():
        raise FileNotFoundError(f"no pretrained tiny base in {SHIPPED_BASE} or {path}, and no {script} to build one")
    subprocess.run([sys.executable, str(script), "--out", str(path), "--overwrite"], check=True)
    return path


def build_tiny_model(out_dir, family: str = "qwen2_5_vl", method: str | None = "mirage", **overrides) -> Path:
    """Tiny base wrapped as a vlatent checkpoint for `method` (`None`: the bare base), cached like the base.

    Overrides that are fields of the method's config (`num_latent_tokens=2`, `stage=2`) go to the method, the
    rest to the model (see `build_tiny_base`). The base itself is kept in `out_dir/base`.
    """
    if method is None:
        return build_tiny_base(out_dir, family=family, **overrides)
    from .methods import method_class
    from .model import LatentVLM

    fields = {f.name for f in dataclasses.fields(method_class(method).config_class)}
    latent = {k: v for k, v in overrides.items() if k in fields}
    model_overrides = {k: v for k, v in overrides.items() if k not in fields}
    out_dir = Path(out_dir)
    marker = out_dir / MARKER
    args = json.loads(json.dumps({"family": family, "method": method, "overrides": overrides}))
    if marker.is_file() and json.loads(marker.read_text()) == args:
        return out_dir
    marker.unlink(missing_ok=True)
    base = build_tiny_base(out_dir / "base", family=family, **model_overrides)
    LatentVLM.from_pretrained(base, method=method, **latent).save_pretrained(out_dir)
    marker.write_text(json.dumps(args, indent=2, sort_keys=True))
    return out_dir


def tiny_image(seed: int = 0, size: tuple[int, int] = (56, 56)) -> Image.Image:
    """A deterministic RGB picture: coloured background with a few random rectangles, ellipses and lines."""
    rng = random.Random(seed)
    width, height = size

    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    def box():
        x0, x1 = sorted(rng.randrange(width + 1) for _ in range(2))
        y0, y1 = sorted(rng.randrange(height + 1) for _ in range(2))
        return x0, y0, max(x1, x0 + 3), max(y1, y0 + 3)

    image = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        draw.rectangle(box(), fill=colour())
        draw.ellipse(box(), fill=colour(), outline=colour())
    draw.line(box(), fill=colour(), width=2)
    return image
