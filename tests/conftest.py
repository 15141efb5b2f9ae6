"""Shared fixtures: one tiny real Qwen2.5-VL per session, wrapped for mirage."""

import copy
import os
from collections import Counter

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlatent.model import LatentVLM  # noqa: E402
from vlatent.testing import build_tiny_base, tiny_image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Path of the tiny base VLM (HF checkpoint + processor), built once."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def mirage_model(tiny_base):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_base, method="mirage").eval()


PROMPTS = ["What shape is this?", "Which way first?", "Hello there"]
PREFIXES = ["", "Let me think.<|latent_start|>", "Go"]


@pytest.fixture(scope="session")
def switching_model(mirage_model):
    """A copy whose LM head emits ``<|latent_start|>`` where it used to emit a common token, so greedy rows enter
    latent mode at different, data-dependent steps (a random model never would on its own)."""
    images = [tiny_image(0), tiny_image(1), None]
    gens = mirage_model.generate(images, PROMPTS, max_new_tokens=30, prefix=PREFIXES)
    counts = Counter(t for g in gens for s in g.segments if hasattr(s, "token_ids") for t in s.token_ids)
    start_id = mirage_model.method.config.latent_start_id
    for token, _ in counts.most_common(20):
        model = copy.deepcopy(mirage_model)
        head = model.backbone.model.get_output_embeddings().weight
        with torch.no_grad():
            head[start_id] = head[token]
            head[token] = -head[token]
        gens = model.generate(images, PROMPTS, max_new_tokens=30, prefix=PREFIXES)
        first_latent = [next((i for i, s in enumerate(g.segments) if hasattr(s, "latents")), None) for g in gens]
        entered = [g for g, f in zip(gens, first_latent) if f is not None and f > 0]
        if len(entered) >= 2 and any(len(g.latent_segments) >= 2 for g in gens):
            return model
    pytest.fail("no LM-head swap made rows switch modes at different steps")
