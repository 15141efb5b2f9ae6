"""vlatent: latent visual reasoning for vision-language models."""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import vlatent` light; heavy modules load on first use
    if name == "LatentVLM":
        from .model import LatentVLM

        return LatentVLM
    if name in ("Generation", "TextSegment", "LatentSegment"):
        from . import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'vlatent' has no attribute {name!r}")


__all__ = ["LatentVLM", "Generation", "TextSegment", "LatentSegment", "__version__"]
