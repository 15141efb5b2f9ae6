"""The one place that turns record messages into the backbone's chat text, through its own chat template."""

from __future__ import annotations

from typing import Callable

from PIL import Image

from ..backbones import backbone_for_processor


class _InlineImage:
    def __repr__(self) -> str:
        return "INLINE_IMAGE"


INLINE_IMAGE = _InlineImage()
"""What ``latent_text(j)`` returns to put helper image j inline as a real image instead of a latent segment."""


def render_chat(
    processor,
    messages: list[dict],
    *,
    latent_text: Callable[[int], str | _InlineImage | tuple],
    add_generation_prompt: bool = False,
    observation: tuple[str, str] | None = None,
) -> tuple[str, list[int]]:
    """Render validated record messages with the processor's chat template.

    Each ``{"type": "latent", "image": j}`` becomes ``latent_text(j)``: a string (a latent segment; "" drops it),
    ``INLINE_IMAGE``, or a tuple of those shown one after the other (e.g. ``(INLINE_IMAGE, segment)``: the helper
    image followed by a latent segment). ``observation=(open, close)`` wraps every text item marked
    ``"observation": true`` in ``open`` ... ``close``; without it the mark is ignored. Returns the text and the record
    image indices in the order of their image placeholders.
    """
    conversation, order = [], []
    for msg in messages:
        content = []
        for item in msg["content"]:
            if item["type"] == "text":
                text = item["text"]
                if observation is not None and item.get("observation", False):
                    text = observation[0] + text + observation[1]
                content.append({"type": "text", "text": text})
                continue
            # Templates treat any item with an "image" key as an image, so latent items never reach them as-is.
            shown = INLINE_IMAGE if item["type"] == "image" else latent_text(item["image"])
            for part in shown if isinstance(shown, tuple) else (shown,):
                if part is INLINE_IMAGE:
                    content.append({"type": "image"})
                    order.append(item["image"])
                elif not isinstance(part, str):
                    raise TypeError(f"latent_text must return a string, INLINE_IMAGE or a tuple of them, got {shown!r}")
                elif part:
                    content.append({"type": "text", "text": part})
        conversation.append({"role": msg["role"], "content": content})
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    found = text.count(processor.image_token)
    if found != len(order):
        raise ValueError(f"chat template rendered {found} image placeholders for {len(order)} images")
    return text, order


def encode_chat(processor, text: str, images: list, images_kwargs: dict | None = None) -> dict:
    """Tokenise one rendered chat with its images, the same way for every family: ``input_ids`` and
    ``mm_token_type_ids`` (lists; 1 on image placeholders) and, with images, ``pixel_values`` / ``image_grid_thw`` as
    the family's adapter packs them (``Backbone.pack_images``). No special tokens are added: the template has them."""
    enc = processor(text=[text], images=[images] if images else None,  # one sample: LLaVA-OV counts its images
                    images_kwargs=images_kwargs or {}, add_special_tokens=False, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    out = {"input_ids": ids, "mm_token_type_ids": processor.create_mm_token_type_ids([ids])[0]}
    if images:
        out["pixel_values"], out["image_grid_thw"] = backbone_for_processor(processor).pack_images(processor, enc)
    return out


def encode_images(processor, images: list, images_kwargs: dict | None = None) -> tuple:
    """Images alone through the image processor -> ``(pixel_values, image_grid_thw)`` packed as ``encode_chat`` does."""
    enc = processor.image_processor(images=images, return_tensors="pt", **(images_kwargs or {}))
    return backbone_for_processor(processor).pack_images(processor, enc)


def image_trailer_length(processor) -> int:
    """How many tokens the template and the processor put between an image's last placeholder and the item after it
    (Qwen: ``<|vision_end|>``, 1; LLaVA-OneVision: 0; Gemma 3: ``<end_of_image>`` and a blank line), read off a
    rendered one-image turn whose next item is a single special token."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": processor.tokenizer.pad_token}]}]
    text = processor.apply_chat_template(turn, tokenize=False)
    side = (getattr(processor.image_processor, "size", None) or {}).get("height") or 56
    ids = encode_chat(processor, text, [Image.new("RGB", (side, side))])["input_ids"]
    image_ids = set(processor.image_token_ids)
    last = max(i for i, t in enumerate(ids) if t in image_ids)
    return ids.index(processor.tokenizer.pad_token_id, last) - last - 1


def chat_format(processor):
    """The ``ChatFormat`` (turn and image marker tokens) of the family this processor belongs to."""
    return backbone_for_processor(processor).chat_format


def chat_messages(prompt, num_images: int, where: str = "prompt") -> list[dict]:
    """One generation row's conversation: a string is one user turn (the images, then the text); chat messages
    (system, user and assistant turns, the user's last) keep their turns, ``{"type": "image"}`` items marking where
    the row's images go, or the images opening the first user turn when no item does."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(m, dict) for m in prompt):
        raise ValueError(f"prompts must be strings or non-empty lists of chat messages ({{'role', 'content'}}): "
                         f"{where} is {prompt!r}")
    messages, marked = [], 0
    for j, m in enumerate(prompt):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or set(m) - {"role", "content"}:
            raise ValueError(f"{where} message {j}: needs role system, user or assistant and content only, got {m!r}")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, list) or not all(isinstance(c, dict) and (c.get("type") == "image" or (
                c.get("type") == "text" and isinstance(c.get("text"), str))) for c in items):
            raise ValueError(f"{where} message {j}: content must be a string or a list of {{'type': 'text', 'text': "
                             f"...}} and {{'type': 'image'}} items, got {content!r}")
        marked += sum(c["type"] == "image" for c in items)
        messages.append({"role": role, "content": [dict(c) for c in items]})
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be the user's (prefix= starts the assistant's answer)")
    if marked == 0 and num_images:
        first = next(m for m in messages if m["role"] == "user")
        first["content"][:0] = [{"type": "image"}] * num_images
    elif marked != num_images:
        raise ValueError(f"{where}: the messages mark {marked} image(s), the row has {num_images}")
    return messages


def render_prompt(processor, prompt, num_images: int, prefix: str = "") -> str:
    """A generation prompt: ``prompt`` (a string or chat messages, see ``chat_messages``) with ``num_images`` images,
    the assistant header, and ``prefix`` verbatim (e.g. the start of an answer the generation loop continues)."""
    return processor.apply_chat_template(chat_messages(prompt, num_images), tokenize=False,
                                         add_generation_prompt=True) + prefix