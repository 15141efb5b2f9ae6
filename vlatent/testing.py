"""Tiny, real HuggingFace checkpoints for tests and demos.

Each builder writes a genuine model + processor with tiny configs and random weights via `save_pretrained`,
so the rest of vlatent loads it with `from_pretrained` exactly as it would load e.g. Qwen/Qwen2.5-VL-7B-Instruct.
Everything is built offline in a few seconds: the tokenizer is a byte-level BPE trained on `CORPUS` below.
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
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLTextConfig,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
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


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A real `Qwen2Tokenizer` over the local BPE; like Qwen's: eos `<|im_end|>`, pad `<|endoftext|>`, no bos/unk."""
    return Qwen2Tokenizer(
        tokenizer_object=_train_bpe(),
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _split_overrides(overrides: dict) -> tuple[dict, dict, dict, dict]:
    """Route overrides to (text config, vision config, image processor, top-level config)."""
    text, vision, image, top = {}, {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key.removeprefix("vision_")] = value
        elif key in ("min_pixels", "max_pixels"):
            image[key] = value
        elif key in Qwen2_5_VLTextConfig.__dataclass_fields__:
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


# One small builder per family; add qwen3_vl / llava_onevision / gemma3 here.
BUILDERS = {"qwen2_5_vl": _build_qwen2_5_vl}


def build_tiny_base(out_dir, family: str = "qwen2_5_vl", seed: int = 0, **overrides) -> Path:
    """Write a tiny random-weight base VLM + processor into out_dir (cached by the `vlatent_tiny.json` marker)."""
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
