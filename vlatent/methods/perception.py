"""Perception tokens: Aurora (arXiv 2412.03548, repo mahtabbigverdi/Aurora-perception).

The model reasons over *discrete* intermediate representations written in its own vocabulary. Where a record has a
latent step (``{"type": "latent", "image": j}``) the collator writes, as ordinary supervised text,

- for a depth map (the ``depth`` builder's helper image): ``<DEPTH_START> <DEPTH_i1> ... <DEPTH_iN> <DEPTH_END>``, the
  N codes of the map under a VQ-VAE tokenizer (``vlatent.decoders.DepthTokenizer``, trained by
  ``train/perception_tokenizer.py``; Aurora: N = 100 codes from a codebook of 128);
- for boxes (records with ``meta.boxes``, the ``count`` builder): ``<BOX_START>`` then 4 tokens per box
  ``<BOX_x0> <BOX_y0> <BOX_x1> <BOX_y1>`` (coordinates quantised to ``box_bins`` bins of the helper image's width
  and height), then ``<BOX_END>``.

The start/end and code tokens are added to the tokenizer and the embeddings; training is plain next-token CE. At
inference decoding inside a segment is constrained (``constrain_logits``): a depth segment takes exactly N code
tokens and then its end token, a box segment takes coordinate tokens in groups of 4 (at most ``max_boxes``) before
its end token, and outside segments code and end tokens are never sampled. So every generated segment decodes:
``parse_segments`` returns the depth codes (``DepthTokenizer.render`` draws them) and ``parse_boxes`` the boxes.

Curriculum (Aurora trains "from atomic perception tasks towards reasoning"; its release orders an annealed data file
on disk and reads it sequentially): here a sampler over on-the-fly views of the records. Record i is index i (its
chain of thought with the tokens); index n + i is its perception view (the question's images, ``depth_prompt`` or
the question + ``box_prompt``, and the segment alone as the answer). In epoch e a record is drawn as its chain of
thought with probability ``curriculum_start + (curriculum_end - curriculum_start) * min(1, e / curriculum_epochs)``,
else as its perception view; ``curriculum_epochs: 0`` trains on the records as they are. With
``curriculum_direct_answer`` a record drawn for reasoning is, half the time, its direct-answer copy (index 2n + i:
the question, ``answer`` alone as the reply), as the release's annealing file mixes the two. LoRA or full fine-tuning is
the recipe's ``lora`` entry (``vlatent.training.lora``): under LoRA the LM head and the new tokens' rows of
embed_tokens train beside the adapters; ``lora.train_embeddings`` trains all of embed_tokens too (Aurora's release).

Choices the paper leaves open: the tokens are written without spaces between them (each is one token either way);
box coordinates are corners in ``box_bins`` bins (Aurora's counting data writes boxes as tokens too); code ids are
contiguous in the vocabulary (checked), so the constraint is a slice.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Sampler

from ..data.records import record_error
from .base import LatentMethod, MethodConfig, register_method

DECODER_DIR = "decoder"  # where a checkpoint keeps its depth tokenizer
TEXT, DEPTH, BOXES = 0, 1, 2  # what a generating row is inside


@dataclass
class PerceptionConfig(MethodConfig):
    num_latent_tokens: int = 100  # N: codes per depth map, the fixed length of a depth segment (the tokenizer's)
    codebook_size: int = 128  # depth code tokens <DEPTH_0> ... (the tokenizer's codebook)
    tokenizer: str | None = None  # depth tokenizer directory (train/perception_tokenizer.py); needed for depth data
    depth_start_token: str = "<DEPTH_START>"
    depth_end_token: str = "<DEPTH_END>"
    depth_code_token: str = "<DEPTH_{}>"
    box_bins: int = 32  # box coordinates are quantised to this many bins per axis
    max_boxes: int = 16  # a generated box segment holds at most this many boxes
    box_start_token: str = "<BOX_START>"
    box_end_token: str = "<BOX_END>"
    box_code_token: str = "<BOX_{}>"
    depth_prompt: str = "What is the depth map of this image? Answer with depth tokens."
    box_prompt: str = "Answer with the boxes only."
    curriculum_epochs: int = 0  # epochs over which the share of chain-of-thought records anneals; 0: no curriculum
    curriculum_start: float = 0.0  # share of chain-of-thought records in epoch 0 (the rest: perception views)
    curriculum_end: float = 1.0  # ... and from epoch curriculum_epochs on
    # True: a record drawn for reasoning is, half the time, its direct-answer copy (question -> ``answer`` only), as the
    # release's annealing file mixes direct-labelling and CoT copies (AiT/vae/create_depth_annealing_data.ipynb)
    curriculum_direct_answer: bool = False
    depth_start_id: int | None = None
    depth_end_id: int | None = None
    depth_code_id: int | None = None  # id of <DEPTH_0>; the codes follow contiguously
    box_start_id: int | None = None
    box_end_id: int | None = None
    box_code_id: int | None = None


def quantise_boxes(boxes, size: tuple[int, int], bins: int) -> list[int]:
    """``[[x0, y0, x1, y1], ...]`` in pixels of an image of ``size`` (w, h) -> flat bin indices."""
    w, h = size
    return [min(bins - 1, max(0, int(v / (w if k % 2 == 0 else h) * bins))) for box in boxes for k, v in enumerate(box)]


def dequantise_boxes(codes: torch.Tensor, size: tuple[int, int], bins: int) -> torch.Tensor:
    """(4m,) bin indices -> (m, 4) box corners in pixels (bin centres)."""
    w, h = size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32) / bins
    return (codes.view(-1, 4).float() + 0.5) * scale


def draw_boxes(boxes: torch.Tensor, image: Image.Image) -> Image.Image:
    """The image with the boxes drawn on it (for inspection)."""
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in boxes.tolist():
        d.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=(255, 0, 0), width=2)
    return out


class PerceptionViews(Dataset):
    """The records (index i), their perception views (index n + i) and, with ``direct``, their direct-answer copies
    (index 2n + i), built when read: nothing is copied."""

    def __init__(self, records: list[dict], view, direct=None):
        self.records, self.view, self.direct = records, view, direct

    def __len__(self) -> int:
        return (2 if self.direct is None else 3) * len(self.records)

    def __getitem__(self, i: int) -> dict:
        n = len(self.records)
        if i < n:
            return self.records[i]
        return self.view(self.records[i - n]) if i < 2 * n else self.direct(self.records[i - 2 * n])


class CurriculumSampler(Sampler[int]):
    """One pass over the records per epoch, each drawn as its chain of thought with the epoch's share (annealed
    linearly over ``epochs``) and otherwise as its perception view; records without a segment always as themselves.
    Deterministic in (seed, epoch), so every rank draws the same order (the Trainer calls ``set_epoch``).
    ``has_direct``: records drawn for reasoning are, with probability 1/2, their direct-answer copy (index 2n + i)."""

    def __init__(self, has_view: list[bool], epochs: int, start: float, end: float, seed: int = 0,
                 has_direct: list[bool] | None = None):
        self.has_view = torch.tensor(has_view, dtype=torch.bool)
        self.has_direct = None if has_direct is None else torch.tensor(has_direct, dtype=torch.bool)
        self.epochs, self.start, self.end, self.seed = epochs, start, end, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def cot_share(self, epoch: int) -> float:
        return self.start + (self.end - self.start) * min(1.0, epoch / self.epochs)

    def __len__(self) -> int:
        return len(self.has_view)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.has_view)
        order = torch.randperm(n, generator=g)
        as_view = (torch.rand(n, generator=g) >= self.cot_share(self.epoch)) & self.has_view[order]
        index = order + n * as_view.long()
        if self.has_direct is not None:
            as_direct = (torch.rand(n, generator=g) < 0.5) & ~as_view & self.has_direct[order]
            index = torch.where(as_direct, order + 2 * n, index)
        return iter(index.tolist())


@register_method
class Perception(LatentMethod):
    name = "perception"
    config_class = PerceptionConfig
    uses_latents = False  # the segments are text tokens in the stream

    def __init__(self, config: PerceptionConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        c = config
        for field, least in (("num_latent_tokens", 1), ("codebook_size", 2), ("box_bins", 2), ("max_boxes", 1),
                             ("curriculum_epochs", 0)):
            value = getattr(c, field)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"perception: {field} must be an integer >= {least}, got {value!r}")
        for field in ("curriculum_start", "curriculum_end"):
            if not 0.0 <= getattr(c, field) <= 1.0:
                raise ValueError(f"perception: {field} must lie in [0, 1], got {getattr(c, field)!r}")
        for field in ("depth_code_token", "box_code_token"):
            if getattr(c, field).count("{}") != 1:
                raise ValueError(f"perception: {field} must contain one '{{}}' for the code, got {getattr(c, field)!r}")
        self.__dict__["_depth_tokenizer"] = None  # kept out of the module tree: frozen, used by the collator on CPU
        self._segment_cache: dict[str, str] = {}

    # -- tokens -----------------------------------------------------------------------------------------
    def depth_tokens(self) -> list[str]:
        return [self.config.depth_code_token.format(i) for i in range(self.config.codebook_size)]

    def box_tokens(self) -> list[str]:
        return [self.config.box_code_token.format(i) for i in range(self.config.box_bins)]

    def special_tokens(self) -> list[str]:
        c = self.config
        return [c.depth_start_token, c.depth_end_token, *self.depth_tokens(),
                c.box_start_token, c.box_end_token, *self.box_tokens()]

    def resolve_token_ids(self, tokenizer) -> None:
        c = self.config

        def ids(tokens: list[str]) -> list[int]:
            found = tokenizer.convert_tokens_to_ids(tokens)
            missing = [t for t, i in zip(tokens, found) if i is None or i == tokenizer.unk_token_id]
            if missing:
                raise ValueError(f"token(s) {missing[:3]} of method 'perception' are not in the tokenizer")
            return found

        c.depth_start_id, c.depth_end_id, c.box_start_id, c.box_end_id = ids(
            [c.depth_start_token, c.depth_end_token, c.box_start_token, c.box_end_token])
        for attr, tokens in (("depth_code_id", self.depth_tokens()), ("box_code_id", self.box_tokens())):
            found = ids(tokens)
            if found != list(range(found[0], found[0] + len(found))):
                raise ValueError(f"perception: the {len(tokens)} tokens {tokens[0]}... do not have contiguous ids")
            setattr(c, attr, found[0])
        if c.tokenizer is not None:
            _ = self.depth_tokenizer  # a wrong path or a tokenizer of another size fails now, at build time

    # -- the depth tokenizer ----------------------------------------------------------------------------
    @property
    def depth_tokenizer(self):
        """The depth VQ-VAE (loaded from ``config.tokenizer`` on first use, checked against the config)."""
        if self._depth_tokenizer is None:
            from ..decoders.depth import DepthTokenizer

            c = self.config
            if c.tokenizer is None:
                raise ValueError("perception: no depth tokenizer; set method_config.tokenizer to a directory written "
                                 "by train/perception_tokenizer.py")
            tok = DepthTokenizer.from_pretrained(c.tokenizer)
            if (tok.num_codes, tok.codebook_size) != (c.num_latent_tokens, c.codebook_size):
                raise ValueError(
                    f"perception: the depth tokenizer {c.tokenizer!r} writes {tok.num_codes} codes per map from a "
                    f"codebook of {tok.codebook_size}, but the method config says num_latent_tokens="
                    f"{c.num_latent_tokens}, codebook_size={c.codebook_size}; make them agree")
            self.__dict__["_depth_tokenizer"] = tok
        return self._depth_tokenizer

    def load_files(self, checkpoint: Path) -> None:
        if (Path(checkpoint) / DECODER_DIR / "decoder_config.json").is_file():
            self.config.tokenizer = str(Path(checkpoint) / DECODER_DIR)
            self.__dict__["_depth_tokenizer"] = None

    def save_files(self, out_dir: Path) -> None:
        if self.config.tokenizer is None:
            return
        target = Path(out_dir) / DECODER_DIR
        if target.resolve() != Path(self.config.tokenizer).resolve():
            shutil.rmtree(target, ignore_errors=True)
            self.depth_tokenizer.save_pretrained(target)

    # -- data -------------------------------------------------------------------------------------------
    def latent_mode(self) -> str:
        return "text"

    def collator_kwargs(self) -> dict:
        return {"latent_text": self.segment_text}

    def segment_text(self, record: dict, j: int) -> str:
        """The perception tokens standing for helper image j of the record (boxes if it has ``meta.boxes``)."""
        c = self.config
        path = record["images"][j]
        boxes = record.get("meta", {}).get("boxes")
        key = f"{path}\0{boxes}"
        if key not in self._segment_cache:
            try:
                with Image.open(path) as im:
                    if boxes is not None:
                        codes = quantise_boxes(boxes, im.size, c.box_bins)
                        text = c.box_start_token + "".join(self.box_tokens()[i] for i in codes) + c.box_end_token
                    else:
                        depth = self.depth_tokenizer.encode([im.convert("L")])[0].tolist()
                        text = c.depth_start_token + "".join(self.depth_tokens()[i] for i in depth) + c.depth_end_token
            except OSError as e:
                raise record_error(record["id"], "", f"images[{j}]", f"cannot read {path!r} ({e})") from e
            except (TypeError, ValueError) as e:
                raise record_error(record["id"], "", "meta.boxes" if boxes is not None else f"images[{j}]",
                                   f"cannot make perception tokens: {e}") from e
            self._segment_cache[key] = text
        return self._segment_cache[key]

    def perception_view(self, record: dict) -> dict:
        """The record's atomic perception task: its question's images, the perception prompt, and the first
        segment alone as the answer."""
        latent = next(it for m in record["messages"] if m["role"] == "assistant" for it in m["content"]
                      if it["type"] == "latent")
        user = next(m for m in record["messages"] if m["role"] == "user")
        images = [it for it in user["content"] if it["type"] == "image"]
        if record.get("meta", {}).get("boxes") is not None:
            prompt = [*user["content"], {"type": "text", "text": " " + self.config.box_prompt}]
        else:
            prompt = [*images, {"type": "text", "text": self.config.depth_prompt}]
        return {**record, "id": f"{record['id']}#perception",
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": [latent]}]}

    def direct_answer_view(self, record: dict) -> dict:
        """The record's question with its ``answer`` alone as the reply (the release's direct-labelling copy)."""
        user = next(m for m in record["messages"] if m["role"] == "user")
        return {**record, "id": f"{record['id']}#direct", "messages": [
            user, {"role": "assistant", "content": [{"type": "text", "text": str(record["answer"])}]}]}

    def training_data(self, records: list[dict], seed: int = 0):
        c = self.config
        if c.curriculum_epochs == 0:
            return records, None
        has_view = [any(it["type"] == "latent" for m in r["messages"] if m["role"] == "assistant"
                        for it in m["content"]) for r in records]
        has_direct = None
        if c.curriculum_direct_answer:
            has_direct = [v and r.get("answer") not in (None, "") for v, r in zip(has_view, records)]
        sampler = CurriculumSampler(has_view, c.curriculum_epochs, c.curriculum_start, c.curriculum_end,
                                    has_direct=has_direct)
        direct = self.direct_answer_view if c.curriculum_direct_answer else None
        return PerceptionViews(records, self.perception_view, direct), sampler

    # -- training ---------------------------------------------------------------------------------------
    def training_losses(self, model, batch):
        embeds = model.embed_inputs(batch)
        hidden = model.run_language_model(embeds, batch).last_hidden_state
        return {"ce": model.lm_loss(hidden, batch["labels"])}

    # -- inference --------------------------------------------------------------------------------------
    def generation_state(self, model, batch) -> dict[str, torch.Tensor]:
        """Per row: inside which segment the prompt leaves it (TEXT / DEPTH / BOXES) and how many codes that segment
        holds so far (a prefix may open a segment)."""
        kind = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long, device=batch["input_ids"].device)
        state = {"kind": kind, "count": torch.zeros_like(kind)}
        for t in range(batch["input_ids"].shape[1]):
            self.observe_tokens(batch["input_ids"][:, t], state)
        return state

    def observe_tokens(self, tokens: torch.Tensor, state) -> None:
        c = self.config
        kind, count = state["kind"], state["count"]
        is_code = ((kind == DEPTH) & (tokens >= c.depth_code_id) & (tokens < c.depth_code_id + c.codebook_size)) | (
            (kind == BOXES) & (tokens >= c.box_code_id) & (tokens < c.box_code_id + c.box_bins))
        opens = (tokens == c.depth_start_id) | (tokens == c.box_start_id)
        state["count"] = torch.where(opens, 0, count + is_code.long())
        kind = torch.where(tokens == c.depth_start_id, DEPTH, torch.where(tokens == c.box_start_id, BOXES, kind))
        state["kind"] = torch.where((tokens == c.depth_end_id) | (tokens == c.box_end_id), TEXT, kind)

    def constrain_logits(self, logits: torch.Tensor, state) -> torch.Tensor:
        """-inf on what a row may not emit now: inside a depth segment anything but codes until it holds N, then
        anything but its end token; inside a box segment anything but coordinates (end allowed after whole boxes);
        outside segments the code and end tokens. ``logits`` (n, vocab)."""
        c = self.config
        kind, count = state["kind"], state["count"]
        depth_codes = slice(c.depth_code_id, c.depth_code_id + c.codebook_size)
        box_codes = slice(c.box_code_id, c.box_code_id + c.box_bins)
        allow = torch.ones_like(logits, dtype=torch.bool)
        allow[:, depth_codes] = False
        allow[:, box_codes] = False
        allow[:, [c.depth_end_id, c.box_end_id]] = False
        allow[kind != TEXT] = False
        depth, boxes = kind == DEPTH, kind == BOXES
        allow[depth & (count < c.num_latent_tokens), depth_codes] = True
        allow[depth & (count >= c.num_latent_tokens), c.depth_end_id] = True
        allow[boxes & (count < 4 * c.max_boxes), box_codes] = True
        allow[boxes & (count % 4 == 0) & (count > 0), c.box_end_id] = True
        return logits.masked_fill(~allow, float("-inf"))

    def _segments(self, generation, start_id: int, end_id: int, first_code: int, n_codes: int) -> list[list[int]]:
        """Code lists of the segments closed in the generated tokens. A leading run of codes closed by an end token
        belongs to a segment the prompt (its prefix) opened; callers drop it when its length shows codes in the prompt."""
        ids = [t for s in generation.segments if hasattr(s, "token_ids") for t in s.token_ids]
        out, current = [], []
        for t in ids:
            if t == start_id:
                current = []
            elif t == end_id and current is not None:
                out.append(current)
                current = None
            elif current is not None and first_code <= t < first_code + n_codes:
                current.append(t - first_code)
            else:
                current = None  # text: no segment is open
        return out

    def parse_segments(self, generation) -> list[torch.LongTensor]:
        """The codes of every complete depth segment of a ``Generation`` (each ``(num_latent_tokens,)``)."""
        c = self.config
        found = self._segments(generation, c.depth_start_id, c.depth_end_id, c.depth_code_id, c.codebook_size)
        return [torch.tensor(s, dtype=torch.long) for s in found if len(s) == c.num_latent_tokens]

    def parse_boxes(self, generation, size: tuple[int, int]) -> list[torch.Tensor]:
        """The boxes of every complete box segment, as ``(m, 4)`` pixel corners in an image of ``size`` (w, h)."""
        c = self.config
        found = self._segments(generation, c.box_start_id, c.box_end_id, c.box_code_id, c.box_bins)
        return [dequantise_boxes(torch.tensor(s, dtype=torch.long), size, c.box_bins)
                for s in found if s and len(s) % 4 == 0]
