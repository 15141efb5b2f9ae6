"""``vlatent demo``: watch a model think in latent space, in the browser.

    vlatent demo [--model PATH] [--examples DATASET_DIR] [--decoder PATH] [--host 127.0.0.1] [--port 7860]

Upload or pick an image, ask a question, press Run: the interleaved reasoning streams in as it is generated, text
segments as text and each latent segment as a card with its inspection views (``vlatent.decoders.inspect``): the
decoded sketch or depth map where the model has a decoder, a heat map of each latent's cosine similarity to the
image's patch features, the latents' nearest vocabulary tokens through the LM head and the input embeddings, and
their norms. "Intervene" reruns the question with the latents zeroed, swapped or noised
(``vlatent.analysis.intervene``); "Compare" also runs with latent reasoning off.

Defaults: ``--model`` is the quick start's trained Mirage model, ``runs/quickstart/mirage_stage2`` (what
``vlatent quickstart`` writes from the current folder), else the same model in the demo's cache, where the quick
start runs once on first use (the page says which). ``--examples`` is the quick start's data, else a small set of
the quick start's task (4x4 frozen-lake maps) built into the cache. A
decoder is read from ``--decoder`` or the checkpoint's ``decoder/`` folder.

``build_demo(model, ...)`` returns the ``gr.Blocks`` for embedding; ``launch`` serves it (queue on, 127.0.0.1,
theme and CSS given to ``launch`` as Gradio 6 wants). The page's logic lives in ``LatentDemo``, whose methods are the
event handlers, so it can be called without a browser.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image, UnidentifiedImageError

from vlatent.analysis import intervene
from vlatent.data import load_records
from vlatent.decoders import image_patch_features, inspect_latents, load_decoder
from vlatent.decoders.inspect import embedding_norm
from vlatent.generation import Generation, GenerationStream, LatentSegment, TextSegment, generate
from vlatent.model import LatentVLM
from vlatent.testing import tiny_image

log = logging.getLogger("vlatent.demo")

DEFAULT_MODEL = Path("runs/quickstart/mirage_stage2")  # `vlatent quickstart`'s trained Mirage model
DEFAULT_EXAMPLES = Path("runs/quickstart/data")  # ... and its dataset
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlatent" / "demo"
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000  # decompression-bomb guard, checked on the header before any pixel is decoded
MAX_SIDE = 1024  # larger images are shrunk (the processor resizes again to its own pixel budget)
MAX_QUESTION_CHARS = 2000
OVERLAY_PX = 160  # width of the heat-map pictures
TEXT_UPDATE_S = 0.1  # the text being written is re-sent at most this often (each update re-sends the whole trace)
LIMITS = {"k": (1, 64), "temperature": (0.0, 2.0), "max_tokens": (1, 1024)}
INTERVENTIONS = {"zero": "latents zeroed", "swap": "latents swapped for another example's",
                 "noise": "latents replaced by Gaussian noise of the same norm"}

CSS = """
.vl-trace { line-height: 1.6; }
.vl-text { white-space: pre-wrap; }
.vl-card { border: 1px solid #a5b4fc; border-radius: 10px; padding: 8px 12px; margin: 8px 0; background: #eef2ff; }
.vl-card-head { font-weight: 600; margin-bottom: 6px; }
.vl-row { display: flex; flex-wrap: wrap; gap: 8px; }
.vl-row figure { margin: 0; text-align: center; font-size: 0.8em; }
.vl-row img { width: 128px; height: auto; border-radius: 6px; image-rendering: pixelated; }
.vl-tokens { font-size: 0.85em; margin-top: 6px; border-collapse: collapse; }
.vl-tokens td, .vl-tokens th { padding: 2px 8px; border-bottom: 1px solid #c7d2fe; text-align: left; }
.vl-note { color: #b45309; }
#vl-gallery .grid-container { grid-template-columns: repeat(auto-fill, 150px) !important; }
"""


class ImageRejected(ValueError):
    """An upload the demo refuses; the message is shown on the page."""


def open_image(path) -> Image.Image:
    """An uploaded file as an RGB image, refusing non-images, oversized files and decompression bombs, and
    shrinking huge pictures to ``MAX_SIDE``."""
    if path is None:
        raise ImageRejected("upload or pick an image first")
    path = Path(path)
    if not path.is_file():
        raise ImageRejected(f"no such file: {path.name}")
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise ImageRejected(f"{path.name} is {path.stat().st_size / 2**20:.0f} MiB; the limit is "
                            f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                if im.width * im.height > MAX_PIXELS:
                    raise ImageRejected(f"{path.name} is {im.width}x{im.height} pixels, over the "
                                        f"{MAX_PIXELS // 10**6} MP limit (decompression-bomb guard)")
                # a cut or corrupt file fails here even where a library in this process (lmms-eval does) has set
                # ImageFile.LOAD_TRUNCATED_IMAGES, under which decoding would pad it silently
                im.verify()
            with Image.open(path) as im:  # verify() leaves its image unusable
                im.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at reduced size
                image = im.convert("RGB")
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(f"{path.name} was refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"{path.name} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(f"{path.name} could not be decoded: {e}") from None
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


# ---------------------------------------------------------------------------------------------------------------------
# What the page shows, as HTML


def _img(image: Image.Image, caption: str) -> str:
    """An inline picture (JPEG data URI: the trace is resent whole on every streamed update, so keep it small)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=90)
    src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    cap = html.escape(caption)
    return f'<figure><img src="{src}" alt="{cap}" title="{cap}"><figcaption>{cap}</figcaption></figure>'


def _token(text: str, score: float) -> str:
    shown = json.dumps(text, ensure_ascii=False)[1:-1]  # control characters and newlines made visible
    return f"<code>{html.escape(shown)}</code>&nbsp;{score:.3f}"


def text_html(text: str) -> str:
    return f'<span class="vl-text">{html.escape(text)}</span>'


def card_html(index: int, segment: LatentSegment, inspection, decoded: list[tuple[Image.Image, str]],
              scale: float, note: str = "") -> str:
    """One latent segment: decoded pictures, heat maps, nearest tokens and norms."""
    norms = inspection.norms
    head = (f"latent segment {index} &middot; K={segment.k} &middot; mean norm {float(norms.mean()):.2f} "
            f"(token embeddings: {scale:.2f})")
    figures = [_img(im, cap) for im, cap in decoded]
    if inspection.overlays is not None:
        figures.append(_img(inspection.mean_overlay, "mean similarity to the image"))
        for j, (im, sim) in enumerate(zip(inspection.overlays, inspection.similarity)):
            figures.append(_img(im, f"z{j + 1}: cos {float(sim.min()):.2f}..{float(sim.max()):.2f}"))
    rows = "".join(
        f"<tr><td>z{j + 1}</td><td>{float(n):.2f}</td><td>{', '.join(_token(*t) for t in lm)}</td>"
        f"<td>{', '.join(_token(*t) for t in emb)}</td></tr>"
        for j, (n, lm, emb) in enumerate(zip(norms, inspection.lm_head_tokens, inspection.embedding_tokens)))
    table = ('<table class="vl-tokens"><tr><th>latent</th><th>norm</th><th>nearest tokens: LM head (p)</th>'
             f"<th>input embeddings (cos)</th></tr>{rows}</table>")
    note = f'<div class="vl-note">{html.escape(note)}</div>' if note else ""
    return (f'<div class="vl-card" data-segment="{index}"><div class="vl-card-head">{head}</div>{note}'
            f'<div class="vl-row">{"".join(figures)}</div>{table}</div>')


def depth_card_html(images: list[Image.Image], note: str = "") -> str:
    """The depth maps decoded from the perception tokens of one text segment."""
    figures = "".join(_img(im, f"depth map {i + 1} (perception tokens)") for i, im in enumerate(images))
    note = f'<div class="vl-note">{html.escape(note)}</div>' if note else ""
    return (f'<div class="vl-card"><div class="vl-card-head">perception tokens</div>{note}'
            f'<div class="vl-row">{figures}</div></div>')


def trace_html(parts: list[str]) -> str:
    return f'<div class="vl-trace">{"".join(parts)}</div>'


# ---------------------------------------------------------------------------------------------------------------------
# The logic behind the page


@dataclass
class RunRecord:
    """The last run of a session, what "Intervene" reruns."""

    image: Image.Image
    question: str
    k: int
    generate_kwargs: dict
    generation: Generation
    image_path: str | None = None


@dataclass
class RunView:
    """One update of the page while a run streams in."""

    status: str = ""
    trace: str = ""
    answer: str = ""
    answer_off: str = ""
    gallery: list[tuple[str, str]] = field(default_factory=list)  # (PNG file, caption)
    record: RunRecord | None = None
    first_segment_s: float | None = None  # seconds from Run to the first segment on the page

    def outputs(self) -> tuple:
        return self.status, self.trace, self.answer, self.answer_off, self.gallery, self.record


@contextmanager
def num_latent_tokens(model: LatentVLM, k: int):
    """Run with K latent steps per segment (the method's config is read when a generation starts)."""
    config = model.method.config
    old, config.num_latent_tokens = config.num_latent_tokens, k
    try:
        yield
    finally:
        config.num_latent_tokens = old


def _number(name: str, value, kind):
    lo, hi = LIMITS[name]
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not lo <= number <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value!r}")
    return number


class LatentDemo:
    """Every event handler of the page. ``run`` is a generator of ``RunView`` updates; nothing here raises on bad
    input: problems come back as a status message."""

    def __init__(self, model: LatentVLM, *, decoder=None, examples: list[tuple[str, str]] = ()):
        self.model = model.eval()
        self.decoder = decoder
        self.decoder_type = getattr(getattr(decoder, "config", None), "type", None)
        self.examples = list(examples)
        self.embedding_scale = embedding_norm(model)
        self._files = tempfile.TemporaryDirectory(prefix="vlatent-demo-")  # the gallery's pictures

    def picture_file(self, image: Image.Image) -> str:
        """``image`` as a PNG file named by its content (written once: Gradio serves the gallery from files, and
        rewriting one while the browser reads it breaks the response)."""
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        path = Path(self._files.name) / f"{hashlib.sha1(buf.getvalue()).hexdigest()}.png"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(buf.getvalue())
            tmp.replace(path)
        return str(path)

    def settings(self, k, temperature, max_tokens, latent_on: bool) -> tuple[int, dict]:
        """Checked UI values -> (K, ``generate`` keyword arguments)."""
        k = _number("k", k, int)
        temperature = _number("temperature", temperature, float)
        max_tokens = _number("max_tokens", max_tokens, int)
        method = self.model.method
        prefix = method.config.latent_start_token if latent_on and method.uses_latents else None
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        return k, {"max_new_tokens": max_tokens, "prefix": prefix, **sampling}

    def _decode_latent(self, segment: LatentSegment) -> tuple[list[tuple[Image.Image, str]], str]:
        """The sketch of a latent segment, when there is a sketch decoder: ([(image, caption)], error note)."""
        if self.decoder_type != "sketch":
            return [], ""
        try:
            return [(self.decoder.render([segment])[0], "decoded sketch")], ""
        except Exception as e:  # a decoder that does not fit this model: say so, keep the other views
            return [], f"sketch decoder failed: {e}"

    def _decode_text(self, segment: TextSegment) -> tuple[list[Image.Image], str]:
        """Depth maps of the perception-token segments inside a text segment (perception method + depth decoder):
        (images, error note)."""
        parse = getattr(self.model.method, "parse_segments", None)
        if self.decoder_type != "depth_vq" or parse is None:
            return [], ""
        try:
            codes = parse(Generation(segments=[segment]))
            return (self.decoder.render(codes) if codes else []), ""
        except Exception as e:
            return [], f"depth decoder failed: {e}"

    def run(self, image_path, question, k=None, temperature=0.0, max_tokens=64, latent_on=True, compare=False):
        """Stream one question: yields ``RunView.outputs()`` after each segment, then the final answers."""
        view = RunView()
        try:
            image = open_image(image_path)
            question = (question or "").strip()
            if not question:
                raise ImageRejected("type a question first")
            if len(question) > MAX_QUESTION_CHARS:
                raise ImageRejected(f"the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
            k, kwargs = self.settings(self.model.method.config.num_latent_tokens if k is None else k,
                                      temperature, max_tokens, latent_on)
        except ValueError as e:  # ImageRejected included
            view.status = f"**Rejected:** {e}"
            yield view.outputs()
            return
        view.status = "Running..."
        yield view.outputs()
        try:
            yield from self._stream(view, image, question, k, kwargs, image_path, compare)
        except Exception as e:  # whatever happens, the server keeps serving; the page says what went wrong
            log.exception("demo run failed")
            view.status = f"**Error:** {type(e).__name__}: {e}"
            yield view.outputs()

    def _stream(self, view: RunView, image, question, k, kwargs, image_path, compare):
        start = shown = time.perf_counter()
        model, parts, pending, n_latent = self.model, [], [], 0
        patches = image_patch_features(model, image) if model.method.uses_latents else None
        # K is read when the generation starts, in the stream's worker: set it first
        with num_latent_tokens(model, k), GenerationStream(model, [image], [question], tokens=True, **kwargs) as stream:
            for _, segment in stream:
                if isinstance(segment, int):  # a token of the text segment being written: shown a few times a second
                    pending.append(segment)
                    if time.perf_counter() - shown < TEXT_UPDATE_S:
                        continue
                    view.trace = trace_html(parts + [text_html(model.tokenizer.decode(pending))])
                    view.status = f"Writing... ({len(parts)} segment(s) done)"
                    shown = time.perf_counter()
                    yield view.outputs()
                    continue
                if view.first_segment_s is None:
                    view.first_segment_s = time.perf_counter() - start
                if isinstance(segment, LatentSegment):
                    n_latent += 1
                    decoded, note = self._decode_latent(segment)
                    inspection = inspect_latents(model, segment.latents, patches, size=OVERLAY_PX)
                    parts.append(card_html(n_latent, segment, inspection, decoded, self.embedding_scale, note))
                    pictures = [(im, f"segment {n_latent}: {cap}") for im, cap in decoded] or \
                        [(inspection.mean_overlay, f"segment {n_latent}: heat map (no sketch decoder)")]
                    view.gallery += [(self.picture_file(im), cap) for im, cap in pictures]
                else:
                    pending = []
                    parts.append(text_html(segment.text))
                    depth, note = self._decode_text(segment)
                    if depth or note:
                        parts.append(depth_card_html(depth, note))
                        view.gallery += [(self.picture_file(im), "depth map") for im in depth]
                view.trace = trace_html(parts)
                view.status = f"Streaming... {len(parts)} segment(s), first after {view.first_segment_s * 1000:.0f} ms"
                shown = time.perf_counter()
                yield view.outputs()
        gen = stream.generations[0]
        view.answer = gen.text
        view.record = RunRecord(image, question, k, kwargs, gen, None if image_path is None else str(image_path))
        if compare:
            off = {**kwargs, "prefix": None}
            view.answer_off = generate(model, [image], [question], allow_latents=False, **off)[0].text
        else:
            view.answer_off = "(turn on Compare to also run with latent reasoning off)"
        first = "no segment" if view.first_segment_s is None else \
            f"first segment after {view.first_segment_s * 1000:.0f} ms"
        view.status = (f"Done in {time.perf_counter() - start:.2f} s: {len(gen.segments)} segment(s), {n_latent} "
                       f"latent, {gen.num_steps} steps, finished by {gen.finish_reason}; {first}.")
        view.trace = trace_html(parts or ['<span class="vl-note">(the model wrote nothing)</span>'])
        yield view.outputs()

    def donor(self, record: RunRecord) -> tuple[Image.Image, str, str]:
        """Another example for "swap": the first example that is not the run's image (else a generated picture)."""
        for path, question in self.examples:
            if record.image_path is None or Path(path).resolve() != Path(record.image_path).resolve():
                try:
                    return open_image(path), question, f"example {Path(path).name}"
                except ImageRejected:
                    continue
        return tiny_image(1, (112, 112)), record.question, "a generated picture, same question"

    def intervene(self, mode: str, record: RunRecord | None) -> str:
        """Rerun the last run's question with its latents replaced; HTML comparing the two answers."""
        try:
            if record is None:
                return '<p class="vl-note">Press Run first: the intervention reruns the last question.</p>'
            if mode not in INTERVENTIONS:
                return f'<p class="vl-note">Unknown intervention {html.escape(str(mode))}.</p>'
            if not record.generation.latent_segments:
                return '<p class="vl-note">The last run has no latent segments to intervene on.</p>'
            donor = {}
            source = ""
            if mode == "swap":
                image, question, source = self.donor(record)
                donor = {"donor_images": [image], "donor_prompts": [question]}
            with num_latent_tokens(self.model, record.k):
                result = intervene(self.model, [record.image], [record.question], mode, baseline=[record.generation],
                                   **donor, **record.generate_kwargs)[0]
        except Exception as e:  # never take the server down
            log.exception("intervention failed")
            return f'<p class="vl-note">Intervention failed: {html.escape(f"{type(e).__name__}: {e}")}</p>'
        norms = ", ".join(f"{float(s.latents.norm(dim=-1).mean()):.2f}" for s in result.generation.latent_segments)
        verdict = "changed" if result.changed else "unchanged"
        source = f" (donor: {html.escape(source)})" if source else ""
        return (f'<div class="vl-card"><div class="vl-card-head">{INTERVENTIONS[mode]}{source}: answer {verdict}'
                f'</div><table class="vl-tokens"><tr><th>unmodified</th><th>{html.escape(mode)}</th></tr>'
                f'<tr><td class="vl-text">{html.escape(result.baseline.text)}</td>'
                f'<td class="vl-text">{html.escape(result.generation.text)}</td></tr></table>'
                f'<div>mean latent norm per segment after the intervention: {norms or "-"}</div></div>')


# ---------------------------------------------------------------------------------------------------------------------
# The page


def upload_input(**kwargs) -> gr.Image:
    """A ``gr.Image`` whose handler gets the uploaded file unopened (Gradio has already checked it lies in its upload
    folder), so ``open_image``, not Pillow inside Gradio, judges it and the page says why a file was refused. An
    instance override rather than a subclass: Gradio writes a ``.pyi`` stub next to the module of any subclass."""
    image = gr.Image(type="filepath", **kwargs)
    opened = image.preprocess  # still used for data URLs, which Gradio itself writes to a file
    image.preprocess = lambda payload: opened(payload) if payload is None or payload.path is None else str(payload.path)
    return image


def build_demo(model: LatentVLM, *, decoder=None, examples: list[tuple[str, str]] = (), note: str = "") -> gr.Blocks:
    """The app as a ``gr.Blocks`` (serve it with ``launch``, or embed it). ``examples``: (image path, question)."""
    app = LatentDemo(model, decoder=decoder, examples=examples)
    method = model.method
    with gr.Blocks(title="vlatent demo", analytics_enabled=False) as demo:
        gr.Markdown("# vlatent: watch a model think in latent space\n" + note)
        with gr.Row():
            with gr.Column(scale=1):
                image = upload_input(label="Image", sources=["upload", "clipboard"], height=260)
                question = gr.Textbox(label="Question", lines=2, placeholder="Ask about the image")
                with gr.Accordion(f"Settings ({method.name})", open=True):
                    k = gr.Slider(*LIMITS["k"], value=method.config.num_latent_tokens, step=1,
                                  label="Latent tokens per segment (K)", interactive=method.uses_latents)
                    temperature = gr.Slider(*LIMITS["temperature"], value=0.0, step=0.05,
                                            label="Sampling temperature (0 = greedy)")
                    max_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens")
                    latent_on = gr.Checkbox(value=method.uses_latents, interactive=method.uses_latents,
                                            label="Start the answer in latent mode")
                    compare = gr.Checkbox(value=False, label="Compare: also run with latent reasoning off")
                run = gr.Button("Run", variant="primary")
                if examples:
                    gr.Examples([[p, q] for p, q in examples], inputs=[image, question], label="Examples")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload or pick an image, type a question and press Run.")
                trace = gr.HTML(label="Reasoning")
                with gr.Row():
                    answer = gr.Textbox(label="Answer (latent reasoning on)", lines=3)
                    answer_off = gr.Textbox(label="Answer (latent reasoning off)", lines=3)
                gallery = gr.Gallery(label="Sketches of this run", columns=6, height=220, preview=False,
                                     object_fit="contain", elem_id="vl-gallery")
                with gr.Row():
                    mode = gr.Radio(list(INTERVENTIONS), value="zero", label="Intervene on the latents")
                    intervene_btn = gr.Button("Intervene")
                intervention = gr.HTML()
        record = gr.State(None)
        run.click(app.run, [image, question, k, temperature, max_tokens, latent_on, compare],
                  [status, trace, answer, answer_off, gallery, record], concurrency_id="model", concurrency_limit=1)
        intervene_btn.click(app.intervene, [mode, record], [intervention], concurrency_id="model",
                            concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Serve the app with the queue on; binds 127.0.0.1 unless told otherwise."""
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    return demo.queue(max_size=16).launch(server_name=host, server_port=port, theme=theme, css=CSS, show_error=True,
                                          max_file_size=MAX_UPLOAD_BYTES, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Loading what the page shows


def load_model(path: str | os.PathLike | None = None) -> tuple[LatentVLM, str, Path]:
    """(model, a line saying what it is, its folder): ``path``, else the quick start's trained Mirage model (from the
    current folder's ``runs/quickstart``, else the demo's cache, where the quick start is run on first use)."""
    if path is not None:
        return LatentVLM.from_pretrained(path).eval(), f"Model: `{path}`.", Path(path)
    cached = CACHE / "quickstart" / DEFAULT_MODEL.name
    for folder in (DEFAULT_MODEL, cached):
        if (folder / "config.json").is_file():
            return LatentVLM.from_pretrained(folder).eval(), f"Model: `{folder}` (the quick start's Mirage).", folder
    from vlatent.cli import main as vlatent_main

    print(f"No trained model at {DEFAULT_MODEL}: training the quick start's Mirage model into {cached.parent} "
          "(once, about 12 minutes on 2 CPU cores)", flush=True)
    if vlatent_main(["quickstart", "--out", str(cached.parent)]):
        raise RuntimeError(f"the quick start failed, so there is no trained model to show: see {cached.parent}")
    return LatentVLM.from_pretrained(cached).eval(), f"Model: `{cached}` (the quick start's Mirage, trained on first " \
        "use).", cached


def find_decoder(model_dir: Path | None, decoder: str | os.PathLike | None, model: LatentVLM | None = None):
    """(decoder or None, a line for the page): ``--decoder``, else the checkpoint's ``decoder/`` folder, else the
    method's own (perception: its depth tokenizer)."""
    path = Path(decoder) if decoder is not None else None
    if path is None and model_dir is not None and (model_dir / "decoder" / "decoder_config.json").is_file():
        path = model_dir / "decoder"
    if path is None and model is not None and getattr(model.method.config, "tokenizer", None):
        own = model.method.depth_tokenizer
        return own, f"Decoder: the method's depth tokenizer `{model.method.config.tokenizer}`."
    if path is None:
        return None, "No decoder with this model: latent segments show heat maps instead of sketches."
    loaded = load_decoder(path)
    return loaded, f"Decoder: `{path}` ({loaded.config.type})."


def load_examples(data: str | os.PathLike | None = None, split: str = "test", limit: int = 8) -> tuple[list, str]:
    """(image path, question) pairs from a built dataset: ``data``, else the quick start's, else a small set of the
    quick start's default task built into the cache."""
    root = Path(data) if data is not None else DEFAULT_EXAMPLES
    if data is None and not (root / "dataset_info.json").is_file():
        root = CACHE / "quickstart" / "data"
    if data is None and not (root / "dataset_info.json").is_file():
        from vlatent.cli import QUICKSTART_TASK, QUICKSTART_TASKS

        task = QUICKSTART_TASK
        root = CACHE / task
        if not (root / "dataset_info.json").is_file():
            from data_builders.__main__ import main as build_data  # the demo runs from the source checkout

            root.parent.mkdir(parents=True, exist_ok=True)
            if build_data([task, "--out", str(root), "--n", "40", *QUICKSTART_TASKS[task]["build"], "--seed", "0"]):
                raise RuntimeError(f"could not build the example {task} set in {root}")
    examples = []
    for rec in load_records(root, split=split)[:limit]:
        user = next(m for m in rec["messages"] if m["role"] == "user")
        first_image = next((c["image"] for c in user["content"] if c["type"] == "image"), None)
        text = "\n".join(c["text"] for c in user["content"] if c["type"] == "text")
        if first_image is not None and text:
            examples.append((rec["images"][first_image], text))
    return examples, f"Examples: `{root}` ({split} split)."


def port(text: str) -> int:
    """A TCP port number, checked before the model loads."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 1 to 65535, got {text!r}")
    return int(text)


def check_bindable(host: str, port: int) -> None:
    """Bind ``host:port`` once and let it go, so that a port in use is reported before the model loads."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as e:
        raise OSError(f"cannot serve on {host}:{port} ({e.strerror or e}): another server may hold the port; "
                      "pass --port (or --host)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlatent demo", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default=None,
                        help=f"LatentVLM checkpoint (default: {DEFAULT_MODEL} if it exists, else the quick start's "
                             "Mirage model in the cache, trained there on first use)")
    parser.add_argument("--examples", default=None,
                        help=f"a built dataset folder to take examples from (default: {DEFAULT_EXAMPLES} if it "
                             "exists, else a small set of the quick start's task)")
    parser.add_argument("--decoder", default=None, help="decoder folder (default: the checkpoint's decoder/)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes the demo)")
    parser.add_argument("--port", type=port, default=7860, help="TCP port, 1 to 65535 (default: 7860)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        check_bindable(args.host, args.port)
        model, model_note, model_dir = load_model(args.model)
        decoder, decoder_note = find_decoder(model_dir, args.decoder, model)
        examples, examples_note = load_examples(args.examples)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build_demo(model, decoder=decoder, examples=examples,
                      note="\n\n".join((model_note, decoder_note, examples_note)))
    launch(demo, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
