"""Shared fixtures: one tiny real Qwen2.5-VL per session, wrapped for mirage."""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlatent.model import LatentVLM  # noqa: E402
from vlatent.testing import build_tiny_base  # noqa: E402


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
    """A copy whose LM head emits ``<|latent_start|>`` where it used to emit " five" (a token the greedy rows of
    PROMPTS write at different steps), so rows enter latent mode at different, data-dependent steps (a random model
    never would on its own). One fixed swap: the tests assert what it must produce (rows switching at different steps,
    several segments in an answer), so a generation bug fails a test instead of a search for another swap."""
    model = copy.deepcopy(mirage_model)
    token = model.tokenizer.convert_tokens_to_ids("\u0120five")
    head = model.backbone.model.get_output_embeddings().weight
    with torch.no_grad():
        head[model.method.config.latent_start_id] = head[token]
        head[token] = -head[token]
    return model


@pytest.fixture(scope="session")
def rough_decoder(tmp_path_factory):
    """An untrained sketch decoder for the tiny ViT's 56 px sketches (16 x 32 features): it draws some picture of any
    sketch, which is all Sketchpad's re-rendering (``augment_sketches``) needs."""
    from vlatent.decoders import SketchDecoder, SketchDecoderConfig

    torch.manual_seed(0)
    config = SketchDecoderConfig(feature_dim=32, num_features=16, image_size=32, encoder_image_size=56)
    return SketchDecoder(config).save_pretrained(tmp_path_factory.mktemp("rough") / "decoder")
