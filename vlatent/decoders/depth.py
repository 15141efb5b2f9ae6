"""The depth-map tokenizer of perception tokens (Aurora, arXiv 2412.03548): a VQ-VAE that turns a depth map into a
fixed-length sequence of discrete codes and back.

The network is a ``diffusers`` ``VQModel`` (conv encoder, vector quantiser, conv decoder) on one-channel depth maps
resized to ``image_size``; with ``len(block_out_channels) - 1`` downsamplings the code grid is
``(image_size / 2^(len - 1))^2`` (Aurora / AiT: 100 codes from a codebook of 128, here by default 80 px -> 10 x 10).
Depth maps are the builders' grayscale PNGs (near = bright), read as ``[-1, 1]``.

On disk a tokenizer is a directory: ``decoder_config.json`` (``"type": "depth_vq"`` and the fields of
``DepthTokenizerConfig``) and the ``VQModel`` saved by ``save_pretrained`` (``config.json`` + safetensors) in ``vq/``.
Trained by ``train/perception_tokenizer.py``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from PIL import Image
from torch import nn

DECODER_CONFIG = "decoder_config.json"


@dataclass
class DepthTokenizerConfig:
    image_size: int = 80  # depth maps are resized to image_size x image_size
    codebook_size: int = 128  # K: distinct codes (Aurora: 128)
    block_out_channels: tuple[int, ...] = (16, 16, 32, 32)  # one entry per resolution; len - 1 downsamplings
    layers_per_block: int = 1
    latent_channels: int = 16  # width of a code vector
    norm_num_groups: int = 8
    type: str = "depth_vq"

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.codebook_size < 2:
            raise ValueError(f"depth tokenizer: codebook_size must be >= 2, got {self.codebook_size}")
        if self.image_size < 1 or self.image_size % factor:
            raise ValueError(f"depth tokenizer: image_size={self.image_size} must be a positive multiple of "
                             f"{factor} (2 ** {len(self.block_out_channels) - 1} downsamplings)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"depth tokenizer: every block_out_channels {self.block_out_channels} must be a multiple "
                             f"of norm_num_groups={self.norm_num_groups}")

    @property
    def grid(self) -> int:
        """Side of the code grid."""
        return self.image_size // 2 ** (len(self.block_out_channels) - 1)

    @property
    def num_codes(self) -> int:
        """Codes per depth map (the fixed length of a perception segment)."""
        return self.grid**2


class DepthTokenizer(nn.Module):
    """Depth maps <-> ``(n, num_codes)`` code sequences (raster order), and codes -> images for inspection."""

    def __init__(self, config: DepthTokenizerConfig):
        super().__init__()
        self.config = config
        n = len(config.block_out_channels)
        self.vq = VQModel(
            in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
            num_vq_embeddings=config.codebook_size, norm_num_groups=config.norm_num_groups,
            sample_size=config.image_size, mid_block_add_attention=False)

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    # -- files ----------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.vq.save_pretrained(out / "vq")
        (out / DECODER_CONFIG).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        return out

    @classmethod
    def from_pretrained(cls, path) -> "DepthTokenizer":
        path = Path(path)
        if not (path / DECODER_CONFIG).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a depth tokenizer: it has no {DECODER_CONFIG} "
                                    "(train one with train/perception_tokenizer.py)")
        raw = json.loads((path / DECODER_CONFIG).read_text())
        if raw.get("type") != "depth_vq":
            raise ValueError(f"{str(path)!r} holds a {raw.get('type')!r} decoder, not a depth tokenizer ('depth_vq')")
        names = {f.name for f in dataclasses.fields(DepthTokenizerConfig)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"{str(path / DECODER_CONFIG)!r}: unknown field(s) {unknown}")
        tokenizer = cls(DepthTokenizerConfig(**raw))
        tokenizer.vq = VQModel.from_pretrained(path / "vq")
        if tokenizer.vq.config.num_vq_embeddings != tokenizer.codebook_size:
            raise ValueError(f"{str(path)!r}: the VQ model has {tokenizer.vq.config.num_vq_embeddings} codes, "
                             f"{DECODER_CONFIG} says {tokenizer.codebook_size}")
        return tokenizer.eval()

    # -- pixels <-> tensors -----------------------------------------------------------------------------
    def to_tensor(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL depth maps -> (n, 1, S, S) in [-1, 1] (grayscale, resized with bilinear filtering)."""
        s = self.config.image_size
        arrays = [np.asarray(im.convert("L").resize((s, s), Image.BILINEAR), dtype=np.float32) for im in images]
        param = next(self.vq.parameters())
        return torch.from_numpy(np.stack(arrays))[:, None].to(param.device, param.dtype) / 127.5 - 1

    @staticmethod
    def to_images(maps: torch.Tensor) -> list[Image.Image]:
        """(n, 1, S, S) in [-1, 1] -> grayscale PIL images."""
        pixels = ((maps.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(p[0], mode="L") for p in pixels]

    # -- the codec --------------------------------------------------------------------------------------
    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: (n, 1, S, S) -> (reconstruction, VQ loss = codebook + 0.25 * commitment)."""
        out = self.vq(maps)
        return out.sample, out.commit_loss.mean()

    @torch.no_grad()
    def encode(self, images: list[Image.Image] | torch.Tensor) -> torch.LongTensor:
        """Depth maps (PIL images or (n, 1, S, S) tensors) -> (n, num_codes) codes in raster order."""
        maps = self.to_tensor(images) if isinstance(images, (list, tuple)) else images
        latents = self.vq.encode(maps).latents  # (n, c, g, g)
        _, _, (_, _, indices) = self.vq.quantize(latents)
        return indices.view(maps.shape[0], self.num_codes)

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """(n, num_codes) codes (or a list of 1-D code tensors) -> (n, 1, S, S) depth maps in [-1, 1]."""
        codes = self._check_codes(codes)
        g, c = self.config.grid, self.vq.config.latent_channels
        param = next(self.vq.parameters())
        quant = self.vq.quantize.get_codebook_entry(codes.reshape(-1).to(param.device), (codes.shape[0], g, g, c))
        return self.vq.decode(quant, force_not_quantize=True).sample

    def render(self, codes) -> list[Image.Image]:
        """One grayscale depth map (near = bright) per code sequence given."""
        return self.to_images(self.decode(codes))

    def _check_codes(self, codes) -> torch.LongTensor:
        """(n, num_codes) / (num_codes,) tensor or a list of 1-D sequences -> (n, num_codes) long, range-checked."""
        if isinstance(codes, (list, tuple)):
            lengths = [torch.as_tensor(c).numel() for c in codes]
            if not codes or any(n != self.num_codes for n in lengths):
                raise ValueError(f"every depth code sequence must hold {self.num_codes} codes, got lengths {lengths}")
            codes = torch.stack([torch.as_tensor(c).reshape(-1) for c in codes])
        codes = torch.as_tensor(codes).long()
        codes = codes[None] if codes.dim() == 1 else codes
        if codes.dim() != 2 or codes.shape[1] != self.num_codes:
            raise ValueError(f"depth codes must have shape (n, {self.num_codes}), got {tuple(codes.shape)}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"depth codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return codes


def depth_reconstruction_error(tokenizer: DepthTokenizer, images: list[Image.Image]) -> dict[str, float]:
    """Encode -> decode held-out depth maps; mean absolute error in gray levels (0-255) and PSNR (dB)."""
    target = tokenizer.to_tensor(images)
    recon = tokenizer.decode(tokenizer.encode(target)).clamp(-1, 1)
    err = (recon.float() - target.float()) * 127.5  # gray levels
    mse = err.pow(2).mean().item()
    return {"mae": err.abs().mean().item(), "psnr": 10 * np.log10(255**2 / max(mse, 1e-12))}
