"""The interleaved text <-> latent decode loop: one loop for every method, batched, on the KV cache.

Each step runs one forward over the whole batch. A row is in text mode (next input = embedding of the sampled
token) or latent mode (next input = ``method.next_latent(last hidden)``), chosen per row by a mask, so rows
switch modes at different steps within one batch. A latent step costs what a text step costs: the prefix is
never recomputed (``use_cache=False`` does recompute it, as the reference the tests compare against).
"""

from __future__ import annotations

import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .methods.base import LATENT_STEPS, LatentContext, bottleneck_spans

LATENT_MARKER = "[latent x{k}]"
LATENT_MARKER_PATTERN = re.compile(re.escape(LATENT_MARKER).replace(re.escape("{k}"), r"\d+"))  # any k


@dataclass
class TextSegment:
    text: str
    token_ids: list[int]


@dataclass
class LatentSegment:
    latents: torch.Tensor  # (k, hidden): the vectors fed back as inputs, in order
    features: torch.Tensor | None = None  # the method's own view of the segment (sketchpad: ViT-space latents)
    means: torch.Tensor | None = None  # (k, hidden): what ``next_latent`` predicted; latents = means + sigma * noise
    positions: torch.Tensor | None = None  # (k,) long: index of each latent step in ``Generation.token_ids``

    @property
    def k(self) -> int:
        return self.latents.shape[0]


@dataclass
class Generation:
    segments: list[TextSegment | LatentSegment] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" or "length"
    num_steps: int = 0  # positions generated for this row (text tokens, latent steps, forced end tokens)
    token_ids: list[int] = field(default_factory=list)  # one per step: tokens (stop token too), latent pad at latents

    @property
    def text(self) -> str:
        """The whole answer, each latent segment shown as a short marker."""
        return "".join(s.text if isinstance(s, TextSegment) else LATENT_MARKER.format(k=s.k) for s in self.segments)

    @property
    def latent_segments(self) -> list[LatentSegment]:
        return [s for s in self.segments if isinstance(s, LatentSegment)]


def _as_image(x, where: str) -> Image.Image:
    if isinstance(x, (str, Path)):
        if not Path(x).is_file():
            raise FileNotFoundError(f"{where}: image file {str(x)!r} does not exist")
        return Image.open(x).convert("RGB")
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    raise ValueError(f"{where} must be a PIL.Image or an image path, got {type(x).__name__}")


def normalize_inputs(images, prompts, prefix):
    """-> (per-row image lists, prompts, per-row prefixes), checking types and counts (VLPO's rollouts too). A prompt
    is a string or a list of chat messages (``chat_messages``); one prompt of either kind is a batch of one."""
    from .data.chat import chat_messages

    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict)):
        prompts, images = [prompts], [images]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a string, a list of chat messages, or a list of either (one per row)")
    if images is None:
        images = [None] * len(prompts)
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
        n = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
        raise ValueError(f"images must be a list with one entry per prompt: got {n} for {len(prompts)} prompts")
    rows = []
    for i, entry in enumerate(images):
        entry = [] if entry is None else entry if isinstance(entry, (list, tuple)) else [entry]
        rows.append([_as_image(x, f"images[{i}]") for x in entry])
    for i, prompt in enumerate(prompts):
        chat_messages(prompt, len(rows[i]), f"prompts[{i}]")  # every row checked before any is encoded
    prefixes = [prefix or ""] * len(prompts) if prefix is None or isinstance(prefix, str) else list(prefix)
    if len(prefixes) != len(prompts):
        raise ValueError(f"prefix must be a string or one per prompt: got {len(prefixes)} for {len(prompts)} prompts")
    return rows, list(prompts), prefixes


def encode_prompts(model, images, prompts, prefixes):
    """Render, tokenise and left-pad the prompts into one batch (the one processor call: VLPO and the demo's heat
    maps reuse it, so their features match generation's)."""
    from .data.chat import encode_chat, render_prompt

    proc, pad_id = model.processor, model.tokenizer.pad_token_id
    encs = [encode_chat(proc, render_prompt(proc, prompt, len(imgs), prefix=pre), imgs)
            for imgs, prompt, pre in zip(images, prompts, prefixes)]
    for e in encs:
        e["attention_mask"] = [1] * len(e["input_ids"])
    width = max(len(e["input_ids"]) for e in encs)

    def left_pad(key, value):
        return torch.tensor([[value] * (width - len(e[key])) + e[key] for e in encs])

    batch = {"input_ids": left_pad("input_ids", pad_id), "attention_mask": left_pad("attention_mask", 0),
             "mm_token_type_ids": left_pad("mm_token_type_ids", 0)}
    with_images = [e for e in encs if "pixel_values" in e]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
    return {k: v.to(model.device) for k, v in batch.items()}


def _pick(logits, do_sample, temperature, top_p, generator):
    """Greedy or temperature / nucleus sampling over (batch, vocab) logits."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, images, prompts, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, use_cache: bool = True, latent_steps: str | None = None, prefix=None,
             generator: torch.Generator | None = None, on_segment=None, on_token=None, latent_hook=None,
             allow_latents: bool = True, latent_sigma: float = 0.0, synced: bool = False) -> list[Generation]:
    """Generate one ``Generation`` per prompt.

    ``images``: one entry per prompt (``None``, a PIL image / path, or a list of them). ``latent_steps``: how a latent
    segment ends (``None``: the method's ``config.latent_steps``, ``"fixed"`` unless a recipe or checkpoint sets it).
    ``"fixed"`` runs exactly K latent steps per segment, as trained; ``"auto"`` ends a segment when the LM head's argmax
    is the end token (at least one step, at most 2K); ``"model"`` is the released decoders' rule: at every latent step
    the head picks a token from its whole vocabulary as it would a text token (greedy or sampled), the end token ends
    the segment (also before the first latent), anything else is replaced by a latent, and after
    ``config.max_latent_steps`` latents (Mirage 8, Monet 10) the end token is forced. ``prefix`` starts the assistant
    turn with given text; ending it with the latent start token makes that row begin in latent mode.

    ``on_segment(row, segment)`` is called as each segment completes and ``on_token(row, token_id)`` for each text
    token as it is sampled, before its segment completes (streaming; see ``GenerationStream``).
    ``latent_hook(z, context)`` replaces the latents about to be fed back, ``(m, hidden) -> (m, hidden)`` for the rows
    ``context.rows`` (interventions; ``LatentSegment.latents`` records what was fed). ``allow_latents=False`` never
    opens a latent segment: latent reasoning off, for comparisons.

    ``latent_sigma > 0`` samples each latent from ``N(mu, sigma^2 I)`` around the method's prediction ``mu`` (RL
    exploration; ``LatentSegment.means`` keeps ``mu``, ``positions`` where each latent sits). ``synced=True`` (ZeRO-3
    with several processes, as HF's ``synced_gpus``): every process runs the same modules the same number of times
    (the parameters are gathered per forward), so a process whose rows are done keeps stepping until all are.
    """
    cfg = model.method.config
    latent_steps = cfg.latent_steps if latent_steps is None else latent_steps
    if latent_steps not in LATENT_STEPS:
        raise ValueError(f"latent_steps must be one of {', '.join(map(repr, LATENT_STEPS))}, got {latent_steps!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if not latent_sigma >= 0:
        raise ValueError(f"latent_sigma must be >= 0, got {latent_sigma}")
    images, prompts, prefixes = normalize_inputs(images, prompts, prefix)

    backbone, method, tok = model.backbone, model.method, model.tokenizer
    uses_latents = method.uses_latents
    if not uses_latents and any(cfg.latent_start_token in p for p in prefixes):
        raise ValueError(f"method {method.name!r} has no latent tokens; prefix cannot start a latent segment")
    k = cfg.num_latent_tokens
    cap = cfg.latent_cap if latent_steps == "model" else None  # "model": the most latents in a segment
    start_id, end_id, pad_latent_id = cfg.latent_start_id, cfg.latent_end_id, cfg.latent_pad_id
    stop_ids = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids(backbone.chat_format.turn_end),
                            tok.get_vocab().get("<|endoftext|>")) if i is not None}
    banned = [i for i in (pad_latent_id, end_id) if i is not None]  # never sampled as text
    if not allow_latents and uses_latents:
        if any(p.endswith(cfg.latent_start_token) for p in prefixes):
            raise ValueError("allow_latents=False, but a prefix starts a latent segment")
        banned.append(start_id)

    batch = encode_prompts(model, images, prompts, prefixes)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    fed = ids  # (n, L + steps), reference loop under the bottleneck: each input id, a latent as the latent pad
    if model.bottlenecked:
        model.require_4d_masks("latent_bottleneck")
        # the cached loop grows the spans one column a step instead of recomputing them over the whole prefix
        hidden_keys = bottleneck_spans(ids, start_id)[0]  # (n, L + steps)
        opened = (ids == start_id).any(1)  # (n,) rows whose first latent start has been fed
    n, device = ids.shape[0], ids.device
    positions = backbone.position_ids(ids, batch["mm_token_type_ids"], batch.get("image_grid_thw"), attn)  # (3, n, L)
    next_pos = positions.reshape(-1, n, positions.shape[-1]).amax(dim=(0, 2)) + 1  # (n,); M-RoPE or 1-D alike
    # where a segment's latents sit from its first (sketchpad: a sketch's image positions; None: text positions)
    offsets = method.latent_positions(backbone) if uses_latents else None
    offsets = None if offsets is None else offsets.to(device)  # (3, K) or (K,)
    segment_start = next_pos.clone()  # (n,): position of the current latent segment's first slot
    embeds, visual = backbone.embed_multimodal(ids, batch.get("pixel_values"), batch.get("image_grid_thw"),
                                               uniform=synced)  # (n, L, hidden)
    out = backbone(embeds, positions, attn, use_cache=use_cache, visual=visual)
    state = method.generation_state(model, batch)
    cache, h = out.past_key_values, out.last_hidden_state[:, -1]  # (n, hidden)

    latent_mode = (ids[:, -1] == start_id) if uses_latents else torch.zeros(n, dtype=torch.bool, device=device)
    n_latent = torch.zeros(n, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    results = [Generation() for _ in range(n)]
    text_ids: list[list[int]] = [[] for _ in range(n)]
    latents: list[list[torch.Tensor]] = [[] for _ in range(n)]
    means: list[list[torch.Tensor]] = [[] for _ in range(n)]
    where: list[list[int]] = [[] for _ in range(n)]  # step index of each latent

    def flush_text(b):
        if text_ids[b]:
            results[b].segments.append(TextSegment(tok.decode(text_ids[b]), text_ids[b]))
            text_ids[b] = []
            if on_segment is not None:
                on_segment(b, results[b].segments[-1])

    def flush_latents(b):
        if latents[b]:
            features = method.segment_features(state, b)
            results[b].segments.append(LatentSegment(torch.stack(latents[b]),
                                                     None if features is None else features.float().cpu(),
                                                     torch.stack(means[b]), torch.tensor(where[b])))
            latents[b], means[b], where[b] = [], [], []
            if on_segment is not None:
                on_segment(b, results[b].segments[-1])

    for step in range(max_new_tokens):
        logits = backbone.logits(h).float()  # (n, vocab)
        if latent_steps == "fixed":
            end_now = latent_mode & (n_latent >= k)
        elif latent_steps == "auto":
            end_now = latent_mode & ((n_latent >= 2 * k) | ((n_latent >= 1) & (logits.argmax(-1) == end_id)))
        whole = logits.clone() if latent_steps == "model" else None  # latent rows pick over the whole vocabulary
        if banned:
            logits[:, banned] = float("-inf")
        logits = method.constrain_logits(logits, state)
        if whole is not None:
            logits = torch.where(latent_mode[:, None], whole, logits)
        tokens = _pick(logits, do_sample, temperature, top_p, generator)  # (n,)
        if latent_steps == "model":  # the picked end token, or the cap
            end_now = latent_mode & ((tokens == end_id) | (n_latent >= cap))
        if uses_latents:
            tokens = torch.where(end_now, end_id, tokens)
        tokens = torch.where(done, tok.pad_token_id, tokens)
        method.observe_tokens(tokens, state)
        feed_latent = latent_mode & ~end_now & ~done
        next_embeds = backbone.embed_tokens(tokens[:, None])  # (n, 1, hidden)
        z = None
        if feed_latent.any() or (synced and uses_latents):  # synced: also with no row, so every process runs it
            context = LatentContext(rows=feed_latent.nonzero().squeeze(1), step=n_latent[feed_latent], state=state)
            mu = method.next_latent(h[feed_latent], context).float()  # (n_latent_rows, hidden)
            z = mu
            if latent_sigma > 0:
                z = mu + latent_sigma * torch.randn(mu.shape, device=mu.device, generator=generator)
            z = z.to(next_embeds.dtype)
            if latent_hook is not None:
                z = latent_hook(z, context).to(next_embeds.dtype)
            next_embeds[feed_latent, 0] = z

        # bookkeeping (host side, one sync per step)
        started = torch.zeros_like(done)
        z_rows = iter(range(z.shape[0])) if z is not None else iter(())
        for b, (t, fl, en, dn) in enumerate(zip(tokens.tolist(), feed_latent.tolist(), end_now.tolist(),
                                                done.tolist())):
            if dn:
                continue
            results[b].num_steps += 1
            results[b].token_ids.append(pad_latent_id if fl else t)
            if fl:
                r = next(z_rows)
                latents[b].append(z[r].float().cpu())
                means[b].append(mu[r].cpu())
                where[b].append(results[b].num_steps - 1)
            elif en:
                flush_latents(b)
            elif t in stop_ids:
                flush_text(b)
                results[b].finish_reason = "eos"
                done[b] = True
            elif uses_latents and t == start_id:
                flush_text(b)
                started[b] = True
            else:
                text_ids[b].append(t)
                if on_token is not None:
                    on_token(b, t)
        n_latent = torch.where(feed_latent, n_latent + 1, torch.where(started, 0, n_latent))
        latent_mode = (latent_mode & ~end_now) | started
        finished = done.all()
        if synced:  # go on while any process has a row left
            finished = finished.to(torch.int)
            torch.distributed.all_reduce(finished, op=torch.distributed.ReduceOp.MIN)
        if bool(finished) or step == max_new_tokens - 1:
            break

        step_pos = backbone.step_position_ids(next_pos)  # the family's ids for one token: (3, n, 1) or (n, 1)
        if offsets is not None and feed_latent.any():  # the latent fed takes its slot's place in the segment
            rows, slot = feed_latent.nonzero().squeeze(1), n_latent[feed_latent] - 1  # (m,), (m,)
            segment_start = torch.where(feed_latent & (n_latent == 1), next_pos, segment_start)
            step_pos = step_pos.clone()
            step_pos[..., rows, 0] = segment_start[rows] + offsets[..., slot]
        attn = torch.cat([attn, attn.new_ones(n, 1)], dim=1)
        if model.bottlenecked and not use_cache:
            fed = torch.cat([fed, torch.where(feed_latent, pad_latent_id, tokens)[:, None]], dim=1)
        if use_cache:
            step_mask = attn
            if model.bottlenecked:  # the fed token's row of the bottleneck mask (``bottleneck_spans``, one column on)
                is_start = ~feed_latent & (tokens == start_id)
                blind = opened & ~is_start  # after the row's first start, and not a start itself
                hidden_keys = torch.cat([hidden_keys, (~opened | is_start)[:, None]], dim=1)
                opened = opened | is_start
                step_mask = attn * ~(blind[:, None] & hidden_keys)
            out = backbone(next_embeds, step_pos, step_mask, past_key_values=cache, use_cache=True, visual=visual)
            cache = out.past_key_values
        else:  # reference path: the whole prefix again
            embeds = torch.cat([embeds, next_embeds], dim=1)
            positions = torch.cat([positions, step_pos], dim=-1)
            out = backbone(embeds, positions, model.decoder_mask({"input_ids": fed, "attention_mask": attn},
                                                                 embeds.dtype), visual=visual)
        h = out.last_hidden_state[:, -1]
        next_pos = torch.maximum(next_pos, step_pos.reshape(-1, n).amax(0) + 1)  # text: +1; a sketch: its max + 1

    for b in range(n):
        flush_text(b)
        flush_latents(b)
    return results


class _Stopped(Exception):
    """Raised inside a streamed generation to end it early (its consumer closed the stream)."""


class GenerationStream:
    """``generate`` as it happens, in a worker thread: iterate for ``(row, segment)`` as each segment completes and,
    with ``tokens=True``, also ``(row, token_id)`` (an int) for each text token as it is sampled (its ``TextSegment``
    follows when the segment completes). Once the iteration ends, ``generations`` holds what ``generate`` returned.
    ``close()`` (or leaving a ``with`` block) stops the worker at its next event. Errors of the generation re-raise
    here.

        with GenerationStream(model, [image], [prompt], max_new_tokens=64) as stream:
            for row, segment in stream: ...
        stream.generations[0].text
    """

    def __init__(self, model, images, prompts, tokens: bool = False, **kwargs):
        self.generations: list[Generation] | None = None
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        kwargs = {**kwargs, "on_segment": self._emit, **({"on_token": self._emit} if tokens else {})}
        self._thread = threading.Thread(target=self._work, args=(model, images, prompts, kwargs), daemon=True)
        self._thread.start()

    def _emit(self, row, item):
        if self._stop.is_set():
            raise _Stopped
        self._events.put(("event", (row, item)))

    def _work(self, model, images, prompts, kwargs):
        try:
            self._events.put(("done", generate(model, images, prompts, **kwargs)))
        except _Stopped:
            self._events.put(("done", None))
        except BaseException as e:  # handed to the consumer's thread
            self._events.put(("error", e))

    def __iter__(self):
        while self.generations is None:
            kind, value = self._events.get()
            if kind == "event":
                yield value
            elif kind == "error":
                raise value
            else:
                self.generations = value if value is not None else []

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
