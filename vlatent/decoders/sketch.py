"""Latent Sketchpad's sketch decoder (arXiv 2510.24514): vision-encoder features -> an image a person can look at.

An **aligner** (a small transformer: the ``num_features`` input vectors self-attend, then one learned query per VAE
latent position cross-attends to them) maps the features of one image to the latent grid of a ``diffusers``
``AutoencoderKL``, whose decoder draws the picture. The decoder is encoder-agnostic: it is trained for one vision
encoder (``feature_dim`` x ``num_features`` in its config) — a VLM's own ViT before the merger (what the
``sketchpad`` method's latents are) or an OpenCLIP ViT's patch tokens (``open_clip:ARCH[:PRETRAINED]``).

On disk a decoder is a directory: ``decoder_config.json`` (``"type": "sketch"`` and the ``SketchDecoderConfig``
fields), ``aligner.safetensors``, and ``vae/`` (the small ``AutoencoderKL`` trained alongside, ``save_pretrained``)
unless ``vae`` names a pretrained one (hub id or path, loaded with ``AutoencoderKL.from_pretrained``).
Trained by ``train/sketch_decoder.py`` on any folder of images.

Choices the release leaves open or that differ from it: the aligner regresses the VAE posterior's *mean* and the
picture is decoded from it (the release predicts a full Gaussian and trains with a Gaussian NLL); the release's VAE is
SDXL's, here a small one is trained from scratch when no pretrained VAE is given.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..configs import from_dict

DECODER_CONFIG = "decoder_config.json"
ALIGNER_WEIGHTS = "aligner.safetensors"
OPEN_CLIP = "open_clip:"


@dataclass
class SketchDecoderConfig:
    feature_dim: int = 1280  # width of the vision features read (the encoder's; 1280 for Qwen2.5-VL-7B's ViT)
    num_features: int = 1024  # vectors per image (Qwen2.5-VL at 448 px: 32 x 32 patches)
    image_size: int = 112  # output pictures are image_size x image_size px
    encoder: str | None = None  # what made the features: a VLM directory / hub id, or "open_clip:ARCH[:PRETRAINED]"
    encoder_image_size: int = 448  # px the encoder saw (the sketchpad method's sketch_size)
    encoder_norm: bool = False  # features after the merger's norm (a sketchpad head_target="merger_norm" draws them)
    vae: str | None = None  # a pretrained AutoencoderKL (hub id or directory); None: the small one trained, in vae/
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32, 32)  # small VAE: one entry per resolution (8x down)
    vae_latent_channels: int = 4
    aligner_dim: int = 128
    aligner_layers: int = 2
    aligner_heads: int = 4
    type: str = "sketch"

    def __post_init__(self):
        self.vae_block_out_channels = tuple(self.vae_block_out_channels)
        for name in ("feature_dim", "num_features", "image_size", "encoder_image_size", "vae_latent_channels",
                     "aligner_dim", "aligner_layers", "aligner_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"sketch decoder: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.aligner_dim % self.aligner_heads:
            raise ValueError(f"sketch decoder: aligner_heads={self.aligner_heads} does not divide "
                             f"aligner_dim={self.aligner_dim}")
        factor = 2 ** (len(self.vae_block_out_channels) - 1)
        if self.vae is None and self.image_size % factor:
            raise ValueError(f"sketch decoder: image_size={self.image_size} must be a multiple of {factor} "
                             f"({len(self.vae_block_out_channels) - 1} VAE downsamplings)")

    @classmethod
    def from_dict(cls, d: dict, where: str = "sketch decoder config") -> "SketchDecoderConfig":
        return from_dict(cls, d, where)


def small_vae(config: SketchDecoderConfig) -> AutoencoderKL:
    """A CPU-sized ``AutoencoderKL`` (len(channels) - 1 downsamplings, one ResNet layer per block, no attention)."""
    n = len(config.vae_block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=config.vae_block_out_channels,
                         layers_per_block=1, latent_channels=config.vae_latent_channels, mid_block_add_attention=False,
                         norm_num_groups=min(16, *config.vae_block_out_channels), sample_size=config.image_size)


class SketchAligner(nn.Module):
    """Vision features ``(b, num_features, feature_dim)`` -> VAE latent means ``(b, channels, h, w)``."""

    def __init__(self, config: SketchDecoderConfig, latent_channels: int, latent_size: int):
        super().__init__()
        c, dim = config, config.aligner_dim
        self.latent_channels, self.latent_size = latent_channels, latent_size
        self.norm_in = nn.LayerNorm(c.feature_dim)
        self.in_proj = nn.Linear(c.feature_dim, dim)
        self.position = nn.Parameter(torch.randn(c.num_features, dim) * 0.02)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, c.aligner_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True),
            c.aligner_layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(latent_size * latent_size, dim) * 0.02)  # one per latent position
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(dim, c.aligner_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True),
            c.aligner_layers)
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, latent_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(self.in_proj(self.norm_in(features)) + self.position)  # (b, n, dim)
        queries = self.queries.expand(features.shape[0], -1, -1)
        out = self.out(self.norm_out(self.decoder(queries, memory)))  # (b, h * w, channels)
        return out.transpose(1, 2).reshape(-1, self.latent_channels, self.latent_size, self.latent_size)


class SketchDecoder(nn.Module):
    """Aligner + ``AutoencoderKL``: ``decode(latents) -> list[PIL.Image]``, one picture per image's features."""

    def __init__(self, config: SketchDecoderConfig, vae: AutoencoderKL | None = None):
        super().__init__()
        self.config = config
        self.vae = vae if vae is not None else small_vae(config)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.aligner = SketchAligner(config, self.vae.config.latent_channels, config.image_size // factor)

    # -- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path) -> "SketchDecoder":
        path = Path(path)
        if not (path / DECODER_CONFIG).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a decoder directory: it has no {DECODER_CONFIG}")
        raw = json.loads((path / DECODER_CONFIG).read_text())
        if raw.get("type") != "sketch":
            raise ValueError(f"{str(path / DECODER_CONFIG)!r}: type {raw.get('type')!r} is not a sketch decoder")
        config = SketchDecoderConfig.from_dict(raw, where=str(path / DECODER_CONFIG))
        decoder = cls(config, load_vae(config.vae) if config.vae else AutoencoderKL.from_pretrained(path / "vae"))
        decoder.aligner.load_state_dict(load_file(str(path / ALIGNER_WEIGHTS)))
        return decoder.eval()

    def save_pretrained(self, path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / DECODER_CONFIG).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.aligner.state_dict().items()},
                  str(path / ALIGNER_WEIGHTS))
        if self.config.vae is None:
            self.vae.save_pretrained(path / "vae", safe_serialization=True)
        return path

    # -- decoding -----------------------------------------------------------------------------------
    def check_features(self, features: torch.Tensor) -> torch.Tensor:
        """(n, d) or (b, n, d) -> (b, n, d), refusing a shape this decoder was not trained for."""
        c = self.config
        if features.dim() == 2:
            features = features[None]
        if features.dim() != 3 or tuple(features.shape[1:]) != (c.num_features, c.feature_dim):
            raise ValueError(f"sketch decoder: got latents of shape {tuple(features.shape)}; it reads "
                             f"{c.num_features} x {c.feature_dim} per image (trained for encoder {c.encoder!r} "
                             f"at {c.encoder_image_size} px)")
        return features

    def decode_tensor(self, features: torch.Tensor) -> torch.Tensor:
        """(b, n, d) features -> (b, 3, image_size, image_size) pictures in [-1, 1] (differentiable)."""
        param = next(self.aligner.parameters())
        latents = self.aligner(self.check_features(features).to(param.device, param.dtype))
        return self.vae.decode(latents.to(self.vae.dtype)).sample.clamp(-1, 1)

    @torch.no_grad()
    def decode(self, latents) -> list[Image.Image]:
        """Features of one or more images — a ``(n, d)`` / ``(b, n, d)`` tensor or a list of ``(n, d)`` tensors —
        -> one PIL picture each."""
        if isinstance(latents, (list, tuple)):
            latents = torch.stack([self.check_features(x)[0] for x in latents]) if latents else None
        if latents is None:
            return []
        return [to_pil(x) for x in self.decode_tensor(latents)]

    def render(self, segments) -> list[Image.Image]:
        """``LatentSegment``(s) of a sketchpad generation -> one picture per segment (from ``segment.features``)."""
        segments = segments if isinstance(segments, (list, tuple)) else [segments]
        features = []
        for i, s in enumerate(segments):
            f = getattr(s, "features", s)
            if not isinstance(f, torch.Tensor):
                raise ValueError(f"segment {i} has no ViT-space features to draw (was it generated by 'sketchpad'?)")
            features.append(f)
        return self.decode(features)


def load_vae(spec: str) -> AutoencoderKL:
    """A pretrained ``AutoencoderKL`` by hub id or directory; ``ID_OR_PATH:SUBFOLDER`` for a pipeline's ``vae``."""
    name, _, subfolder = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    try:
        return AutoencoderKL.from_pretrained(name, subfolder=subfolder or None)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load the VAE {spec!r} (a diffusers AutoencoderKL directory or hub id): "
                                f"{e}") from e


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, h, w) in [-1, 1] -> RGB picture."""
    array = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB picture -> (3, size, size) in [-1, 1] (bicubic resize)."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


# -- vision encoders the decoder can be trained for ----------------------------------------------------------------
class BackboneVisionEncoder:
    """A VLM's own vision encoder before the merger (``backbone.vision_features``) on pictures resized to
    ``image_size`` px, exactly as the sketchpad method sees its helper images: ``images -> (b, n, d)``; ``norm=True``
    adds the merger's norm (``backbone.vision_feature_norm``), the space of a ``head_target="merger_norm"`` head."""

    def __init__(self, backbone, processor, image_size: int, norm: bool = False):
        if norm and backbone.vision_feature_norm is None:
            raise ValueError(f"encoder norm: {backbone.family}'s projector has no per-vector norm")
        self.backbone, self.processor, self.image_size, self.norm = backbone, processor, image_size, norm
        self.feature_dim = backbone.vision_feature_size

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, image_size: int, norm: bool = False) -> "BackboneVisionEncoder":
        from transformers import AutoConfig, AutoProcessor

        from ..backbones import backbone_class

        try:
            config = AutoConfig.from_pretrained(path_or_hub_id)
        except OSError as e:
            raise FileNotFoundError(f"encoder {path_or_hub_id!r} is not a VLM directory or hub id: {e}") from e
        adapter = backbone_class(config.model_type)
        model = adapter.model_class.from_pretrained(path_or_hub_id).eval()
        return cls(adapter(model), AutoProcessor.from_pretrained(path_or_hub_id), image_size, norm)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        from ..data.chat import encode_images

        s = self.image_size
        pixels, grid = encode_images(self.processor, [im.convert("RGB").resize((s, s), Image.Resampling.BICUBIC)
                                                      for im in images],
                                     type(self.backbone).fixed_size_images_kwargs(self.processor, s))
        device = self.backbone.model.device
        features = torch.stack(self.backbone.vision_features(pixels.to(device), grid.to(device)))
        if self.norm:
            norm = self.backbone.vision_feature_norm
            features = norm(features.type(norm.weight.dtype))
        return features.float()


class OpenClipVisionEncoder:
    """An OpenCLIP ViT's patch tokens (``open_clip:ARCH[:PRETRAINED]``; no PRETRAINED tag: random weights, offline)."""

    def __init__(self, spec: str, image_size: int):
        import open_clip

        arch, _, pretrained = spec.removeprefix(OPEN_CLIP).partition(":")
        if arch not in open_clip.list_models():
            raise ValueError(f"encoder {spec!r}: unknown OpenCLIP architecture {arch!r}")
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None, force_image_size=image_size)
        self.visual = model.visual.eval()
        self.visual.output_tokens = True
        self.image_size = image_size
        self.feature_dim = self.visual.transformer.width

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images])
        _, tokens = self.visual(x)
        return tokens.float()  # (b, grid * grid, width)


def load_vision_encoder(spec: str, image_size: int, norm: bool = False):
    """``open_clip:ARCH[:PRETRAINED]`` -> an OpenCLIP ViT; anything else -> that VLM's own ViT (directory or hub id),
    after its merger's norm with ``norm=True``."""
    if spec.startswith(OPEN_CLIP):
        if norm:
            raise ValueError("encoder norm is the VLM merger's norm; an OpenCLIP encoder has none")
        return OpenClipVisionEncoder(spec, image_size)
    return BackboneVisionEncoder.from_pretrained(spec, image_size, norm)
