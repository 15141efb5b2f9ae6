"""Runnable builders that write interleaved visual chain-of-thought datasets as vlatent records.

Synthetic tasks (``maze``, ``vsp``, ``jigsaw``, ``depth``, ``count``), perception captions of their pictures
(``captions``, the tiny base's pretraining data), converters from public datasets (``mirage``,
``monet``, ``zebra_cot``, ``llava``) and tools (``validate``, ``preview``); each is ``vlatent build-data NAME ...``
and ``python -m data_builders.NAME ...``.
"""

BUILDERS = ("maze", "vsp", "jigsaw", "depth", "count")
PERCEPTION = ("captions",)  # pretraining data for the tiny base that sees: no questions, no latent steps
CONVERTERS = ("mirage", "monet", "zebra_cot", "llava")
TOOLS = ("validate", "preview")
