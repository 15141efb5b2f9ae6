"""Records -> a padded training batch: tokens with expanded image placeholders, latent segments, labels on the
assistant turns only, the pixels of inline images and the helper images that latent segments should look like.

Opt-in extras (off by default, so methods that do not ask see exactly the batches they always did):
``observation_tokens`` wraps text marked ``"observation": true`` in two single tokens and adds ``observation_mask``;
``teacher_latent_mode`` adds ``batch["teacher"]``, the same records collated in a second latent mode (what a
distillation teacher sees); ``latent_targets=False`` skips the helper-image targets of ``"latent"`` mode; ``latent_target_size=S`` resizes them
to exactly S x S pixels (a method whose latents are a fixed grid, e.g. Latent Sketchpad's sketches).

Records are never truncated: cutting inside an image or a latent segment is what makes a model fail with "image
features and image tokens do not match", so a record over ``max_length`` is an error or is skipped. With
``image_token_budget`` a record's images are first shrunk together to that many image tokens (Monet's release).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from ..backbones import backbone_for_processor
from ..methods.base import LatentTokens
from .chat import INLINE_IMAGE, chat_format, encode_chat, encode_images, render_chat
from .records import RecordError, record_error

LATENT_MODES = ("latent", "image", "drop", "image+latent", "text")
IGNORE_INDEX = -100


class InterleavedCollator:
    """Collate validated records (see ``load_records``) for any registered backbone family (its ``ChatFormat``).

    ``latent_mode`` says what stands where a record has ``{"type": "latent", "image": j}``: ``"latent"`` a latent
    segment ``start pad*K end`` whose target is helper image j, ``"image"`` helper image j inline, ``"drop"``
    nothing, ``"image+latent"`` helper image j inline immediately followed by a latent segment (no target: the image
    is in the sequence), ``"text"`` the supervised text ``latent_text(record, j)`` returns (perception tokens).
    ``min_pixels``/``max_pixels`` bound every image's area, hence its number of image tokens.
    ``image_token_budget=B`` scales all images of a record down by one factor (aspect kept, on the patch grid, never
    below ``min_pixels``) when their tokens total more than B, so the record holds at most B image tokens
    (``budget_sizes``; ``shrunk_ids`` lists the records shrunk); ``max_length`` / ``on_overflow`` still apply after.
    ``unsupervised_tokens``: single tokens that never get a label, wherever they stand (Monet's released tags).

    ``observation_tokens=(open, close)`` (two single tokens, e.g. ``("<observation>", "</observation>")``) wraps
    every text item marked ``"observation": true`` in them and adds ``observation_mask`` (batch, seq; bool): True
    on the tokens strictly between an ``open`` and its ``close``. Both tags are ordinary supervised text.
    ``teacher_latent_mode`` adds ``batch["teacher"]``: the same (kept) records collated with that latent mode and
    otherwise the same settings, except that it is never checked against ``max_length``.
    ``latent_targets=False`` leaves out ``latent_target_pixel_values``/``latent_target_grid_thw`` in ``"latent"`` mode;
    ``latent_target_size=S`` resizes every helper image to S x S pixels first and pins the image processor to that area,
    so each target has the same grid (S a multiple of the backbone's patch size x merge size).
    ``latent_target_pixels=S`` adds ``latent_target_images`` (segments, 3, S, S) in [-1, 1]: the helper images' raw
    pixels, resized (CoCoVa's reconstruction target).
    """

    def __init__(
        self,
        processor,
        *,
        latent_tokens: LatentTokens | None,
        num_latent_tokens: int = 4,
        latent_mode: str = "latent",
        max_length: int | None = None,
        on_overflow: str = "error",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        padding_side: str = "right",
        observation_tokens: tuple[str, str] | None = None,
        teacher_latent_mode: str | None = None,
        latent_targets: bool = True,
        latent_target_size: int | None = None,
        latent_target_pixels: int | None = None,
        latent_text=None,
        image_token_budget: int | None = None,
        unsupervised_tokens: tuple[str, ...] = (),
    ):
        if latent_mode not in LATENT_MODES:
            raise ValueError(f"latent_mode={latent_mode!r}; expected one of {', '.join(LATENT_MODES)}")
        if (latent_mode == "text") != callable(latent_text):
            raise ValueError('latent_mode="text" and latent_text (a callable (record, j) -> str) go together')
        if latent_mode in ("latent", "image+latent") and latent_tokens is None:
            raise ValueError(f'latent_mode="{latent_mode}" needs latent_tokens (the method config\'s latent_tokens)')
        if teacher_latent_mode is not None and teacher_latent_mode not in LATENT_MODES:
            raise ValueError(f"teacher_latent_mode={teacher_latent_mode!r}; expected one of {', '.join(LATENT_MODES)}")
        if observation_tokens is not None and (not isinstance(observation_tokens, (tuple, list))
                                               or len(observation_tokens) != 2
                                               or observation_tokens[0] == observation_tokens[1]):
            raise ValueError(f"observation_tokens must be two different tokens (open, close), "
                             f"got {observation_tokens!r}")
        if not isinstance(num_latent_tokens, int) or num_latent_tokens < 1:
            raise ValueError(f"num_latent_tokens must be a positive integer, got {num_latent_tokens!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        if on_overflow not in ("error", "skip"):
            raise ValueError(f'on_overflow={on_overflow!r}; expected "error" or "skip"')
        if padding_side not in ("left", "right"):
            raise ValueError(f'padding_side={padding_side!r}; expected "left" or "right"')
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if latent_target_size is not None and (not isinstance(latent_target_size, int) or latent_target_size < 1):
            raise ValueError(f"latent_target_size must be a positive integer or None, got {latent_target_size!r}")
        if latent_target_pixels is not None and (not isinstance(latent_target_pixels, int) or latent_target_pixels < 1):
            raise ValueError(f"latent_target_pixels must be a positive integer or None, got {latent_target_pixels!r}")
        if image_token_budget is not None and (not isinstance(image_token_budget, int) or image_token_budget < 1):
            raise ValueError(f"image_token_budget must be a positive integer or None, got {image_token_budget!r}")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} is larger than max_pixels={max_pixels}")

        self.processor = processor
        self.tokenizer = tok = processor.tokenizer
        self.latent_tokens = latent_tokens
        self.num_latent_tokens = num_latent_tokens
        self.latent_mode = latent_mode
        self.max_length = max_length
        self.on_overflow = on_overflow
        self.padding_side = padding_side
        self.num_skipped = 0
        self.image_token_budget = image_token_budget
        self.shrunk_ids: set[str] = set()
        self._budget_cache: dict[str, dict | None] = {}
        self.skipped_ids: list[str] = []
        self.latent_targets = latent_targets
        self.latent_target_size = latent_target_size
        self.latent_target_pixels = latent_target_pixels
        self.latent_text = latent_text
        self.observation_tokens = tuple(observation_tokens) if observation_tokens is not None else None

        if tok.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.chat_format = fmt = chat_format(processor)  # the family's turn and image marker tokens
        self.im_start_id, self.im_end_id = self._token_id(fmt.turn_start), self._token_id(fmt.turn_end)
        # Image tokens stay unsupervised even inside assistant turns; latent pads too (the method fills them).
        vision = [self._token_id(t) for t in fmt.image_markers]
        not_supervised = [processor.image_token_id, *processor.image_token_ids, *vision]
        if latent_mode in ("latent", "image+latent"):
            # All three must be single tokens, else a segment would be split into text pieces and supervised as such.
            _, pad, _ = (self._token_id(t) for t in (latent_tokens.start, latent_tokens.pad, latent_tokens.end))
            not_supervised.append(pad)
            self.latent_item = latent_tokens.segment(num_latent_tokens)
            if latent_mode == "image+latent":
                self.latent_item = (INLINE_IMAGE, self.latent_item)
        else:
            self.latent_item = INLINE_IMAGE if latent_mode == "image" else ""
        not_supervised += [self._token_id(t) for t in unsupervised_tokens]
        self.not_supervised = set(not_supervised)
        if self.observation_tokens is not None:
            self.observation_ids = tuple(self._token_id(t) for t in self.observation_tokens)
        # Record text must not smuggle in control tokens: they would shift images, latents or turn boundaries.
        self.control_tokens = [t.content for t in tok.added_tokens_decoder.values() if t.special]

        self.images_kwargs = {}
        if min_pixels is not None or max_pixels is not None:
            size = processor.image_processor.size
            if "longest_edge" not in size:
                raise ValueError(f"min_pixels / max_pixels bound the area of dynamic-resolution images (Qwen-VL); "
                                 f"{type(processor.image_processor).__name__} resizes every image to {dict(size)}")
            self.images_kwargs["size"] = {"shortest_edge": min_pixels or size["shortest_edge"],
                                          "longest_edge": max_pixels or size["longest_edge"]}
        if image_token_budget is not None and "longest_edge" not in processor.image_processor.size:
            raise ValueError(f"image_token_budget shrinks dynamic-resolution images (Qwen-VL); "
                             f"{type(processor.image_processor).__name__} resizes every image to "
                             f"{dict(processor.image_processor.size)}")

        self.teacher = None
        if teacher_latent_mode is not None:
            self.teacher = InterleavedCollator(
                processor, latent_tokens=latent_tokens, num_latent_tokens=num_latent_tokens,
                latent_mode=teacher_latent_mode, max_length=None, min_pixels=min_pixels, max_pixels=max_pixels,
                padding_side=padding_side, observation_tokens=observation_tokens, latent_targets=latent_targets,
                image_token_budget=image_token_budget, unsupervised_tokens=unsupervised_tokens)

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{token!r} is not a single token of this tokenizer; add it as a special token first")
        return ids[0]

    # -- one record ---------------------------------------------------------------------------------
    def _open(self, record: dict, j: int, shrink: bool = True) -> Image.Image:
        path = record["images"][j]
        try:
            with Image.open(path) as im:
                if not shrink:  # the header's size only
                    return im
                image = im.convert("RGB")
        except Exception as e:  # missing, truncated or not an image; PIL raises many types
            raise record_error(record["id"], "", f"images[{j}]", f"cannot read {path!r} ({type(e).__name__}: {e})")
        sizes = self.budget_sizes(record)
        return image if sizes is None else image.resize(sizes[j], Image.Resampling.BICUBIC)

    def budget_sizes(self, record: dict) -> dict[int, tuple[int, int]] | None:
        """``{image index: (width, height)}`` shrinking every image the record uses by one factor so their tokens total
        at most ``image_token_budget``; None when there is no budget or the record is within it. The release's rule
        (Monet ``src/utils.py`` ``resize_by_token_budget``) on the sizes the processor would encode: each side times
        sqrt(budget / tokens), floored to the grid unit (patch x merge), then the processor's own bounds."""
        if self.image_token_budget is None:
            return None
        if record["id"] in self._budget_cache:
            return self._budget_cache[record["id"]]
        used = sorted({it["image"] for msg in record["messages"] for it in msg["content"] if "image" in it})
        proc = self.processor.image_processor
        unit = proc.patch_size * proc.merge_size
        size = self.images_kwargs.get("size", proc.size)
        low, high = size["shortest_edge"], size["longest_edge"]
        hw = {j: smart_resize(im.height, im.width, unit, low, high)
              for j, im in ((j, self._open(record, j, shrink=False)) for j in used)}
        area = sum(h * w for h, w in hw.values())
        sizes = None
        if area > self.image_token_budget * unit * unit:
            ratio = math.sqrt(self.image_token_budget * unit * unit / area)
            sizes = {}
            for j, (h, w) in hw.items():
                h, w = (max(unit, int(x * ratio) // unit * unit) for x in (h, w))
                h, w = smart_resize(h, w, unit, low, high)  # a side on the grid stays; below min_pixels grows
                sizes[j] = (w, h)
            self.shrunk_ids.add(record["id"])
        self._budget_cache[record["id"]] = sizes
        return sizes

    def _check_text(self, record: dict) -> None:
        for m, msg in enumerate(record["messages"]):
            for c, item in enumerate(msg["content"]):
                if item["type"] != "text":
                    continue
                for token in self.control_tokens:
                    if token in item["text"]:
                        raise record_error(record["id"], "", f"messages[{m}].content[{c}].text",
                                           f"contains the control token {token!r}")

    def _tokenize(self, record: dict) -> dict:
        """The record's chat rendered and tokenised with its inline images (``encode_chat``'s output)."""
        self._check_text(record)
        item = (lambda j: self.latent_text(record, j)) if self.latent_mode == "text" else lambda j: self.latent_item
        text, order = render_chat(self.processor, record["messages"], latent_text=item,
                                  observation=self.observation_tokens)
        return encode_chat(self.processor, text, [self._open(record, j) for j in order], self.images_kwargs)

    def length(self, record: dict) -> int:
        """The record's token count, without the labels and latent targets ``encode`` builds too (length checks)."""
        return len(self._tokenize(record)["input_ids"])

    def encode(self, record: dict) -> dict:
        """One record -> unpadded ``input_ids``, ``labels``, ``mm_token_type_ids`` (lists) and its pixels."""
        enc = self._tokenize(record)
        ids = enc["input_ids"]
        row = {"id": record["id"], "input_ids": ids, "attention_mask": [1] * len(ids), "labels": self._labels(ids),
               "mm_token_type_ids": enc["mm_token_type_ids"]}
        if "pixel_values" in enc:
            row["pixel_values"], row["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
        if self.observation_tokens is not None:
            row["observation_mask"] = self._observation_mask(ids)
        targets = []
        if self.latent_mode == "latent":
            targets = [it["image"] for msg in record["messages"] for it in msg["content"] if it["type"] == "latent"]
        if targets and self.latent_targets:
            helpers = [self._open(record, j) for j in targets]
            kwargs = self.images_kwargs
            if self.latent_target_size is not None:
                s = self.latent_target_size
                helpers = [h.resize((s, s), Image.Resampling.BICUBIC) for h in helpers]
                kwargs = backbone_for_processor(self.processor).fixed_size_images_kwargs(self.processor, s)
            row["latent_target_pixel_values"], row["latent_target_grid_thw"] = encode_images(self.processor, helpers,
                                                                                             kwargs)
        if targets and self.latent_target_pixels is not None:  # raw helper pixels, e.g. a reconstruction target
            s = self.latent_target_pixels
            helpers = [np.asarray(self._open(record, j).resize((s, s), Image.Resampling.BICUBIC)) for j in targets]
            row["latent_target_images"] = torch.from_numpy(np.stack(helpers)).permute(0, 3, 1, 2).float() / 127.5 - 1
        row["num_latent_segments"] = len(targets)
        if self.latent_mode == "image+latent":
            row["num_latent_segments"] = sum(it["type"] == "latent" for msg in record["messages"]
                                             for it in msg["content"])
        return row

    def _observation_mask(self, ids: list[int]) -> list[int]:
        """1 on the tokens strictly between an observation open tag and its close tag, 0 elsewhere (tags included)."""
        open_id, close_id = self.observation_ids
        mask, inside = [], False
        for i in ids:
            if i == open_id:
                inside = True
                mask.append(0)
            elif i == close_id:
                inside = False
                mask.append(0)
            else:
                mask.append(int(inside))
        return mask

    def _labels(self, ids: list[int]) -> list[int]:
        """Supervise each assistant turn's content and its closing ``<|im_end|>``, found from token ids:
        ``<|im_start|>`` + role tokens up to the first token holding a newline, then content up to ``<|im_end|>``
        (the family's ``ChatFormat``: Gemma's are ``<start_of_turn>``, role ``model``, ``<end_of_turn>``)."""
        labels = [IGNORE_INDEX] * len(ids)
        t = 0
        while t < len(ids):
            if ids[t] != self.im_start_id:
                t += 1
                continue
            head = t + 1
            while head < len(ids) and "\n" not in self.tokenizer.decode([ids[head]]):
                head += 1
            role = self.tokenizer.decode(ids[t + 1 : head + 1]).strip()
            end = head + 1
            while end < len(ids) and ids[end] != self.im_end_id:
                end += 1
            if role == self.chat_format.assistant_role:
                for p in range(head + 1, min(end + 1, len(ids))):
                    if ids[p] not in self.not_supervised:
                        labels[p] = ids[p]
            t = end + 1
        return labels

    # -- a batch ------------------------------------------------------------------------------------
    def __call__(self, records: list[dict]) -> dict:
        rows, kept = [], []
        for record in records:
            row = self.encode(record)
            n = len(row["input_ids"])
            if self.max_length is not None and n > self.max_length:
                if self.on_overflow == "error":
                    raise record_error(record["id"], "", "length",
                                       f"{n} tokens > max_length={self.max_length}; records are never truncated "
                                       '(raise max_length, or pass on_overflow="skip" to drop such records)')
                self.num_skipped += 1
                self.skipped_ids.append(record["id"])
                continue
            rows.append(row)
            kept.append(record)
        if not rows:
            raise RecordError(f"all {len(records)} records of the batch are longer than max_length={self.max_length} "
                              f"tokens: {[r['id'] for r in records]}")
        batch = self._pad(rows)
        if self.teacher is not None:
            batch["teacher"] = self.teacher._pad([self.teacher.encode(record) for record in kept])
        return batch

    def _pad(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            out = []
            for r in rows:
                fill = [value] * (width - len(r[key]))
                out.append(r[key] + fill if self.padding_side == "right" else fill + r[key])
            return torch.tensor(out, dtype=torch.long)

        batch = {
            "input_ids": pad("input_ids", self.tokenizer.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
            "mm_token_type_ids": pad("mm_token_type_ids", 0),
        }
        if self.observation_tokens is not None:
            batch["observation_mask"] = pad("observation_mask", 0).bool()
        for key in ("pixel_values", "image_grid_thw", "latent_target_pixel_values", "latent_target_grid_thw",
                    "latent_target_images"):
            parts = [r[key] for r in rows if key in r]
            if parts:
                batch[key] = torch.cat(parts)
        batch["num_latent_segments"] = torch.tensor([r["num_latent_segments"] for r in rows], dtype=torch.long)
        batch["ids"] = [r["id"] for r in rows]
        return batch
