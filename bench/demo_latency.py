"""Demo latency: time from pressing Run to the first streamed segment, on the tiny model.

    python bench/demo_latency.py [--model PATH] [--repeats 10] [--no-browser]

Three levels, each the median (min..max) of ``--repeats`` runs after two warm-ups, the question starting in latent
mode (so the first segment is a latent card: prefill + K latent steps + its inspection views):
- handler: ``LatentDemo.run`` called directly, until its first update holding a segment;
- server: the same through the running app (HTTP + the queue's event stream, ``gradio_client``), until the first
  streamed update holding a segment;
- browser: headless Chromium (Debian's, through Playwright) clicks Run until the first latent card is on the page.
Also the time to the whole answer. Prints a markdown table to paste into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the demo app lives in the source checkout

from demo.app import LatentDemo, build_demo, launch  # noqa: E402
from vlatent.model import LatentVLM  # noqa: E402
from vlatent.testing import build_tiny_model, tiny_image  # noqa: E402

QUESTION = "Which shape is closest to the top right corner?"


def stats(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f} ms ({min(xs) * 1000:.0f}..{max(xs) * 1000:.0f})"


def measure(fn, repeats: int) -> tuple[list[float], list[float]]:
    """``fn()`` -> (seconds to first segment, seconds to the end); two warm-ups, then ``repeats`` runs."""
    for _ in range(2):
        fn()
    runs = [fn() for _ in range(repeats)]
    return [r[0] for r in runs], [r[1] for r in runs]


def handler_run(app: LatentDemo, image: str, max_tokens: int):
    t0 = time.perf_counter()
    first = None
    for update in app.run(image, QUESTION, None, 0.0, max_tokens, True, False):
        if first is None and update[0].startswith("Streaming"):
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def server_run(client, image: str, max_tokens: int):
    from gradio_client import handle_file

    t0 = time.perf_counter()
    job = client.submit(handle_file(image), QUESTION, 4, 0.0, max_tokens, True, False, api_name="/run")
    first = None
    for update in job:
        if first is None and str(update[0]).startswith("Streaming"):
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def browser_run(page, url: str, image: str):
    page.goto(url)
    page.get_by_role("button", name="Run", exact=True).wait_for()
    page.locator("input[type=file]").first.set_input_files(image)
    page.get_by_label("Question").fill(QUESTION)
    page.locator("[data-testid='image'] img").first.wait_for()
    t0 = time.perf_counter()
    page.get_by_role("button", name="Run", exact=True).click()
    page.locator(".vl-card").first.wait_for()
    first = time.perf_counter() - t0
    page.get_by_text("Done in").wait_for()
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a LatentVLM checkpoint (default: the tiny Mirage model)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="vlatent-bench-"))
    path = args.model or build_tiny_model(tmp / "tiny", method="mirage")
    model = LatentVLM.from_pretrained(path).eval()
    image = str(tmp / "image.png")
    tiny_image(0, (176, 176)).save(image)
    k = model.method.config.num_latent_tokens
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model {path} ({params:.1f}M params, K={k}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, max_tokens {args.max_tokens}")

    rows = [("handler (`LatentDemo.run`)", *measure(lambda: handler_run(LatentDemo(model), image, args.max_tokens),
                                                   args.repeats))]
    demo = build_demo(model)
    port = _free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        from gradio_client import Client

        client = Client(url, verbose=False)
        rows.append(("server (HTTP + event stream)", *measure(lambda: server_run(client, image, args.max_tokens),
                                                             args.repeats)))
        chromium = shutil.which("chromium")
        if not args.no_browser and chromium:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
                page = browser.new_page()
                rows.append(("browser (click Run -> card on the page)",
                             *measure(lambda: browser_run(page, url, image), args.repeats)))
                browser.close()
    finally:
        demo.close()

    print("\n| level | Run -> first segment | Run -> whole answer |\n|---|---|---|")
    for name, first, total in rows:
        print(f"| {name} | {stats(first)} | {stats(total)} |")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
