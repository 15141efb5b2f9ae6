"""The demo: streamed generation, latent inspection views, interventions, the app's handlers called directly on the
tiny model, bad uploads refused with a message, and the page driven in a real headless Chromium."""

import os
import re
import shutil
import socket
import sys
import urllib.error
import urllib.request
from html import unescape
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from vlatent.analysis import MODES, intervene
from vlatent.cli import main as vlatent_main
from vlatent.decoders import image_patch_features, inspect_latents
from vlatent.generation import GenerationStream, LatentSegment, TextSegment, generate
from vlatent.testing import tiny_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the apps are not installed packages; import them from the checkout, as the CLI does

from data_builders.__main__ import main as build_data  # noqa: E402
from demo.app import MAX_SIDE, LatentDemo, build_demo, launch, load_examples, open_image  # noqa: E402

START = "<|latent_start|>"
STATUS, TRACE, ANSWER, ANSWER_OFF, GALLERY, RECORD = range(6)  # LatentDemo.run's outputs


@pytest.fixture(scope="module")
def maze_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("maze") / "data"
    assert build_data(["maze", "--out", str(out), "--n", "20", "--size", "4", "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    tiny_image(3, (112, 112)).save(path)
    return path


# -- streaming -----------------------------------------------------------------------------------------------------


def test_stream_yields_each_rows_segments_as_generate_returns_them(switching_model):
    images, prompts = [tiny_image(0), tiny_image(1), None], ["What shape is this?", "Which way first?", "Hello there"]
    kwargs = {"max_new_tokens": 30, "prefix": ["", "Let me think." + START, "Go"]}
    expected = generate(switching_model, images, prompts, **kwargs)
    stream = GenerationStream(switching_model, images, prompts, tokens=True, **kwargs)
    seen, tokens = [[] for _ in prompts], [[] for _ in prompts]
    for row, item in stream:
        if isinstance(item, int):  # a text token, streamed before its segment completes
            tokens[row].append(item)
            continue
        assert tokens[row] == (item.token_ids if isinstance(item, TextSegment) else [])
        tokens[row] = []
        seen[row].append(item)
    assert [g.text for g in stream.generations] == [g.text for g in expected]
    for row, gen in enumerate(expected):
        assert len(seen[row]) == len(gen.segments) and any(isinstance(s, LatentSegment) for s in gen.segments)
        for got, want in zip(seen[row], gen.segments):
            assert type(got) is type(want)
            if isinstance(want, LatentSegment):
                torch.testing.assert_close(got.latents, want.latents)


def test_stream_reraises_errors_and_stops_when_closed(mirage_model):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        list(GenerationStream(mirage_model, [tiny_image(0)], ["hi"], max_new_tokens=0))
    with GenerationStream(mirage_model, [tiny_image(0)], ["hi"], max_new_tokens=200, prefix=START) as stream:
        row, first = next(iter(stream))
    assert row == 0 and isinstance(first, LatentSegment)
    stream._thread.join(timeout=60)
    assert not stream._thread.is_alive()


def test_allow_latents_false_never_opens_a_segment(switching_model):
    images, prompts = [tiny_image(0), tiny_image(1)], ["What shape is this?", "Which way first?"]
    on = generate(switching_model, images, prompts, max_new_tokens=30)
    off = generate(switching_model, images, prompts, max_new_tokens=30, allow_latents=False)
    assert any(g.latent_segments for g in on) and not any(g.latent_segments for g in off)
    with pytest.raises(ValueError, match="allow_latents=False"):
        generate(switching_model, images, prompts, max_new_tokens=4, allow_latents=False, prefix=START)


# -- inspection ----------------------------------------------------------------------------------------------------


def test_inspection_views_of_a_latent_segment(mirage_model):
    image = tiny_image(2, (112, 112))
    gen = generate(mirage_model, [image], ["Where is the red square?"], max_new_tokens=6, prefix=START)[0]
    latents = gen.latent_segments[0].latents  # (k, hidden)
    patches = image_patch_features(mirage_model, image)
    rows, cols = patches.grid
    assert patches.features.shape == (rows * cols, mirage_model.backbone.hidden_size) and rows * cols > 1
    view = inspect_latents(mirage_model, latents, patches, top=3)
    k = latents.shape[0]
    torch.testing.assert_close(view.norms, latents.norm(dim=-1))
    want = F.cosine_similarity(latents[:, None], patches.features[None], dim=-1).view(k, rows, cols)
    torch.testing.assert_close(view.similarity, want)
    assert len(view.overlays) == k and all(im.size[0] == 224 for im in view.overlays)
    assert len(view.lm_head_tokens) == k and all(len(t) == 3 for t in view.lm_head_tokens)
    probs = [p for _, p in view.lm_head_tokens[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1

    # a latent equal to a token's input embedding has that token nearest, at cosine 1
    tok = mirage_model.tokenizer
    ids = tok.encode(" circle square")
    table = mirage_model.backbone.model.get_input_embeddings().weight
    view = inspect_latents(mirage_model, table[ids].detach())
    for token_id, nearest in zip(ids, view.embedding_tokens):
        assert nearest[0][0] == tok.decode([token_id]) and nearest[0][1] == pytest.approx(1.0, abs=1e-4)
    assert view.similarity is None and view.overlays is None
    with pytest.raises(ValueError, match="latents must be"):
        inspect_latents(mirage_model, latents[0])


# -- interventions -------------------------------------------------------------------------------------------------


def test_intervene_replaces_latents_as_asked(mirage_model):
    images, prompts = [tiny_image(0), tiny_image(1)], ["Which way first?", "What shape is this?"]
    kwargs = {"max_new_tokens": 12, "prefix": START}
    base = generate(mirage_model, images, prompts, **kwargs)

    none = intervene(mirage_model, images, prompts, "none", **kwargs)
    assert [r.answer for r in none] == [r.baseline_answer for r in none] and not any(r.changed for r in none)
    assert [r.generation.text for r in none] == [g.text for g in base]

    zero = intervene(mirage_model, images, prompts, "zero", baseline=base, **kwargs)
    for r, b in zip(zero, base):
        assert r.baseline is b and r.baseline_answer == "".join(
            s.text for s in b.segments if isinstance(s, TextSegment)).strip()
        assert r.generation.latent_segments and all(bool((s.latents == 0).all()) for s in r.generation.latent_segments)

    noise = intervene(mirage_model, images, prompts, "noise", baseline=base, seed=1, **kwargs)
    for r, b in zip(noise, base):
        fed, orig = r.generation.latent_segments[0].latents[0], b.latent_segments[0].latents[0]
        assert float(fed.norm()) == pytest.approx(float(orig.norm()), rel=1e-4)  # same state -> same norm
        assert float(F.cosine_similarity(fed, orig, dim=0)) < 0.5

    swap = intervene(mirage_model, images, prompts, "swap", baseline=base, **kwargs)
    for i, r in enumerate(swap):
        donor = base[1 - i].latent_segments[0].latents
        assert r.donor == 1 - i
        torch.testing.assert_close(r.generation.latent_segments[0].latents, donor)

    donors = intervene(mirage_model, images[:1], prompts[:1], "swap", donor_images=[images[1]],
                       donor_prompts=[prompts[1]], **kwargs)
    torch.testing.assert_close(donors[0].generation.latent_segments[0].latents, base[1].latent_segments[0].latents)
    assert donors[0].baseline.text == base[0].text
    # donors already run (another batch's baseline): their latents, no generation for them
    ran = intervene(mirage_model, images[:1], prompts[:1], "swap", baseline=base[:1], donor_runs=base[1:], **kwargs)
    torch.testing.assert_close(ran[0].generation.latent_segments[0].latents, base[1].latent_segments[0].latents)

    # donors are the next examples that have latents: a row that never entered latent mode is skipped
    mixed = intervene(mirage_model, images + [tiny_image(2)], prompts + ["Where?"], "swap", max_new_tokens=8,
                      prefix=[START, "", START])
    assert not mixed[1].baseline.latent_segments and [r.donor for r in mixed] == [2, 2, 0]
    torch.testing.assert_close(mixed[0].generation.latent_segments[0].latents,
                               mixed[2].baseline.latent_segments[0].latents)


@pytest.mark.parametrize("mode, kwargs, match", [
    ("erase", {}, "unknown intervention mode"),
    ("swap", {}, "swap needs another example"),
    ("swap", {"donor_prompts": ["x"]}, "go together"),
    ("swap", {"donor_runs": []}, "one donor run per example"),
    ("zero", {"baseline": []}, "baseline has 0 generations"),
])  # fmt: skip
def test_intervene_bad_arguments_are_named(mirage_model, mode, kwargs, match):
    assert set(MODES) == {"none", "zero", "swap", "noise"}
    with pytest.raises(ValueError, match=match):
        intervene(mirage_model, [tiny_image(0)], ["q"], mode, max_new_tokens=4, **kwargs)


# -- the app's handlers ----------------------------------------------------------------------------------------------


def test_run_streams_text_and_latent_cards_with_images(mirage_model, image_file, maze_dir):
    examples, note = load_examples(maze_dir)
    assert examples and all(Path(p).is_file() and q for p, q in examples) and str(maze_dir) in note
    app = LatentDemo(mirage_model, examples=examples)
    updates = list(app.run(str(image_file), "Where is the circle?", 3, 0.0, 24, True, True))
    assert updates[0][STATUS] == "Running..."
    streamed = [u for u in updates if u[STATUS].startswith("Streaming")]
    final = updates[-1]
    gen = final[RECORD].generation
    assert len(streamed) == len(gen.segments) >= 2  # one page update per segment, as each completes
    assert "vl-card" in streamed[0][TRACE] and "<img" in streamed[0][TRACE]  # the latent card came first
    assert final[STATUS].startswith("Done") and "first segment after" in final[STATUS]
    assert final[TRACE].count('class="vl-card"') == len(gen.latent_segments) == 1
    assert gen.latent_segments[0].k == 3 and mirage_model.method.config.num_latent_tokens == 4  # K restored
    assert "latent segment 1" in final[TRACE] and "nearest tokens" in final[TRACE]
    text = next(s for s in gen.segments if isinstance(s, TextSegment)).text
    assert final[ANSWER] == gen.text and final[ANSWER].startswith("[latent x3]") and text
    assert final[ANSWER_OFF] and "[latent" not in final[ANSWER_OFF]  # compare: latent reasoning off
    (picture, caption), = final[GALLERY]
    assert Image.open(picture).size[0] > 0 and "heat map" in caption

    html = app.intervene("zero", final[RECORD])
    assert "latents zeroed" in html
    unmodified, zeroed = (unescape(t) for t in re.findall(r'<td class="vl-text">(.*?)</td>', html, re.S))
    assert unmodified == gen.text  # the baseline column is the run being intervened on
    words = [re.sub(r"\[latent x\d+\]", "", t).strip() for t in (unmodified, zeroed)]
    assert f"answer {'changed' if words[0] != words[1] else 'unchanged'}" in html, (words, html)
    assert "after the intervention: 0.00" in html  # the rerun really fed zero latents
    html = app.intervene("swap", final[RECORD])
    assert "donor: example" in html  # another example of the dataset lent its latents
    assert "Press Run first" in app.intervene("noise", None)
    assert "Unknown intervention" in app.intervene("erase", final[RECORD])


def test_run_refuses_bad_uploads_and_settings_with_a_message(mirage_model, image_file, tmp_path, monkeypatch):
    app = LatentDemo(mirage_model)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(bomb)  # 64 MP in a few KB
    cut = tmp_path / "cut.png"
    cut.write_bytes(image_file.read_bytes()[:200])
    cases = [
        ((str(text), "q"), "not an image"), ((str(bomb), "q"), "decompression-bomb guard"),
        ((str(cut), "q"), "could not be decoded"), ((None, "q"), "upload or pick an image"),
        ((str(image_file), "  "), "type a question"), ((str(image_file), "q" * 3000), "the limit is 2000"),
        ((str(image_file), "q", 0), "k must be between 1 and 64"),
        ((str(image_file), "q", 4, "hot"), "temperature must be a number"),
        ((str(image_file), "q", 4, 0.0, 10**6), "max_tokens must be between"),
    ]  # fmt: skip
    for args, message in cases:
        (update,) = list(app.run(*args))
        assert update[STATUS].startswith("**Rejected:**") and message in update[STATUS], (args[0], update[STATUS])
    # a library in the same process that lets Pillow decode cut files (lmms-eval sets this flag on import)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    (update,) = list(app.run(str(cut), "q"))
    assert "could not be decoded" in update[STATUS], update[STATUS]


def test_huge_images_are_shrunk(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (3000, 1500), (10, 200, 30)).save(path)
    image = open_image(path)
    assert image.size == (MAX_SIDE, MAX_SIDE // 2) and image.mode == "RGB"


def test_build_demo_and_cli(mirage_model, tmp_path, capsys):
    import gradio as gr

    assert isinstance(build_demo(mirage_model, note="tiny"), gr.Blocks)
    with socket.socket() as s:  # a free port: the demo binds it once before it looks for the model
        s.bind(("127.0.0.1", 0))
        free = str(s.getsockname()[1])
    assert vlatent_main(["demo", "--model", str(tmp_path / "missing"), "--port", free]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        vlatent_main(["demo", "--help"])
    assert exit_.value.code == 0 and "--host" in capsys.readouterr().out


# -- the page in a real browser ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_or_skip() -> str:
    """Debian's Chromium and Playwright's Python package; CI (VLATENT_REQUIRE_BROWSER=1) fails instead of skipping."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        chromium = None
    if chromium is None:
        reason = "needs Debian's chromium (apt-get install chromium) and playwright (pip install -e '.[test]')"
        if os.environ.get("VLATENT_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium


@pytest.mark.slow
def test_page_in_headless_chromium(mirage_model, maze_dir, tmp_path):
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    examples, note = load_examples(maze_dir)
    demo = build_demo(mirage_model, examples=examples, note="browser test: " + note)
    port = _free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(url)
            run = page.get_by_role("button", name="Run", exact=True)
            run.wait_for()
            page.locator("input[type=file]").first.set_input_files(examples[0][0])
            page.get_by_label("Question").fill("Which way first?")
            page.get_by_label("Compare: also run with latent reasoning off").check()
            page.locator("[data-testid='image'] img").first.wait_for()  # the upload is on the page
            run.click()
            page.get_by_text("Done in").wait_for()

            trace = page.locator(".vl-trace").inner_text()
            assert "latent segment 1" in trace and "nearest tokens" in trace
            answer = page.get_by_label("Answer (latent reasoning on)").input_value()
            assert answer.startswith("[latent x4]")
            assert "[latent" not in page.get_by_label("Answer (latent reasoning off)").input_value()
            card_images = page.locator(".vl-card img")
            assert card_images.count() >= 2  # mean heat map + one per latent
            widths = card_images.evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert all(w > 0 for w in widths), widths  # decoded, not broken images
            gallery = page.locator("#vl-gallery img").first
            gallery.wait_for()
            page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=gallery.element_handle())

            # a malformed request is refused without taking the server down; the page keeps working
            bad = urllib.request.Request(url + "gradio_api/queue/join", data=b"{not json",
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(bad, timeout=30)
            assert 400 <= refused.value.code < 500
            page.get_by_role("button", name="Intervene", exact=True).click()
            page.get_by_text("latents zeroed").wait_for()

            # a file that is not an image, uploaded through a fresh page: refused with our message
            not_image = tmp_path / "notes.png"
            not_image.write_text("not a picture")
            page.goto(url)
            run.wait_for()
            with page.expect_response(lambda r: "/upload" in r.url) as uploaded:
                page.locator("input[type=file]").first.set_input_files(str(not_image))
            assert uploaded.value.ok
            page.wait_for_timeout(300)  # the page takes the uploaded file as the image's value
            page.get_by_label("Question").fill("Which way first?")
            run.click()
            page.get_by_text("is not an image Pillow can read").wait_for()
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_sketchpad_cards_show_the_decoded_sketch(tiny_base, image_file, tmp_path):
    """A sketchpad checkpoint carrying a sketch decoder in ``decoder/``: every latent card shows its decoded sketch."""
    from demo.app import find_decoder
    from vlatent.decoders import SketchDecoder, SketchDecoderConfig
    from vlatent.model import LatentVLM

    torch.manual_seed(0)
    model = LatentVLM.from_pretrained(tiny_base, method="sketchpad", sketch_size=56, head_heads=4).eval()
    ckpt = model.save_pretrained(tmp_path / "sketchpad")
    SketchDecoder(SketchDecoderConfig(feature_dim=32, num_features=16, image_size=32)).save_pretrained(
        ckpt / "decoder")  # random weights: the page only renders what the decoder draws
    decoder, note = find_decoder(ckpt, None)
    assert isinstance(decoder, SketchDecoder) and "decoder" in note
    app = LatentDemo(LatentVLM.from_pretrained(ckpt), decoder=decoder)
    final = list(app.run(str(image_file), "Sketch the route.", None, 0.0, 12, True, False))[-1]
    assert final[STATUS].startswith("Done"), final[STATUS]
    n_segments = len(final[RECORD].generation.latent_segments)
    assert final[TRACE].count("<figcaption>decoded sketch</figcaption>") == n_segments >= 1
    assert all("decoded sketch" in caption and Image.open(path).size == (32, 32) for path, caption in final[GALLERY])
    assert find_decoder(tmp_path, None)[0] is None  # no decoder/: heat maps only
