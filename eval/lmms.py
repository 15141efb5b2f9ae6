"""lmms-eval adapter: any vlatent checkpoint as the lmms-eval model ``vlatent``, latent reasoning on, generating with
``LatentVLM.generate`` in batches (``pip install -e ".[lmms]"``, see eval/README.md).

    python -m eval.lmms --model vlatent --model_args pretrained=ckpt/,latent=auto --tasks mmstar --batch_size 8

``python -m eval.lmms`` registers the model and hands its arguments to lmms-eval's command line. ``model_args``:
``pretrained`` (folder or hub id), ``method`` (for a base VLM without ``vlatent_config.json``), ``latent``
(``auto`` / ``on`` / ``off``, as ``vlatent eval --latent``), ``max_new_tokens`` (256, unless the task sets it),
``device``, ``dtype``. Answers are greedy unless the task asks for a temperature; latent segments are dropped from the
text a task scores (``[latent x4]`` would read as the number 4) and a task's ``until`` strings cut it, as
lmms-eval's own HF models do.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

from vlatent.model import LatentVLM

from .benchmarks import answer_text
from .run import LATENT_MODES, latent_kwargs

MANIFEST = ModelManifest(model_id="vlatent", simple_class_path=f"{__name__}.VlatentLMM")


class VlatentLMM(lmms):
    """A ``LatentVLM`` behind lmms-eval's ``generate_until``; likelihood tasks are refused (the latent decode loop
    generates, it does not score continuations)."""

    def __init__(self, pretrained: str, method: str | None = None, latent: str = "auto", batch_size: int | str = 8,
                 max_new_tokens: int | str = 256, device: str | None = None, dtype: str | None = None, **kwargs):
        super().__init__()
        if latent not in LATENT_MODES:
            raise ValueError(f"latent must be one of {', '.join(LATENT_MODES)}, got {latent!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = LatentVLM.from_pretrained(pretrained, method=method,
                                               dtype=getattr(torch, dtype) if dtype else None).to(device).eval()
        self.latent = latent_kwargs(self.model, latent)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests) -> list[str]:
        """One answer per request, in order; consecutive requests of one task with the same generation options are
        generated together, ``batch_size`` at a time."""
        answers: list[str] = []
        batch: list = []
        for request in tqdm(requests, disable=self.rank != 0, desc="vlatent"):
            if batch and (len(batch) == self.batch_size or _key(batch[0]) != _key(request)):
                answers += self._generate(batch)
                batch = []
            batch.append(request)
        return answers + (self._generate(batch) if batch else [])

    def _generate(self, requests) -> list[str]:
        contexts, options, to_visual, doc_ids, tasks, splits = zip(*(request.args for request in requests))
        images = [_images(to_visual[0](self.task_dict[task][split][doc_id]), task, doc_id)
                  for doc_id, task, split in zip(doc_ids, tasks, splits)]
        options = dict(options[0])
        until = options.pop("until", None) or []
        sampling = {"do_sample": True, "temperature": float(options["temperature"])} \
            if float(options.get("temperature") or 0) > 0 else {}
        generations = self.model.generate(images, list(contexts), **self.latent, **sampling,
                                          max_new_tokens=int(options.get("max_new_tokens", self.max_new_tokens)))
        return [_cut(answer_text(g.text), [until] if isinstance(until, str) else until) for g in generations]

    def loglikelihood(self, requests):
        raise NotImplementedError("vlatent answers by generating (generate_until tasks); it does not score "
                                  "log-likelihoods")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vlatent answers single-round generate_until tasks")


def _images(visuals, task: str, doc_id) -> list[Image.Image]:
    """A document's visuals as RGB images; a video or audio visual is refused rather than silently dropped."""
    visuals = visuals or []
    if other := [type(v).__name__ for v in visuals if not isinstance(v, Image.Image)]:
        raise ValueError(f"task {task!r} document {doc_id}: vlatent takes images, not {', '.join(other)}")
    return [v.convert("RGB") for v in visuals]


def _key(request) -> tuple:
    """What requests generated together must share: the task, its split and its generation options."""
    _, options, _, _, task, split = request.args
    return task, split, repr(sorted(options.items()))


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def register() -> None:
    """Make ``--model vlatent`` known to lmms-eval in this process (an installed vlatent also declares it as an
    ``lmms_eval.models`` entry point)."""
    from lmms_eval import evaluator
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=True)
    if importlib.util.find_spec("filelock._api") is None:
        # lmms-eval 0.7.3 patches filelock 3's ``filelock._api``, which filelock 4 no longer has, and fails on import
        # before evaluating anything; with filelock 4 there is nothing for that patch to do, so mark it done
        evaluator._enable_reentrant_filelocks._patched = True


def main(argv: list[str] | None = None) -> None:
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    register()
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    lmms_eval_main()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
