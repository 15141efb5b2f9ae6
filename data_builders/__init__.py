"""Runnable builders that write interleaved visual chain-of-thought datasets as vlatent records.

Synthetic tasks (``maze``, ``vsp``, ``jigsaw``, ``depth``, ``count``), converters from public datasets (``mirage``,
``monet``, ``zebra_cot``, ``llava``) and tools (``validate``, ``preview``); each is ``vlatent build-data NAME ...``
and ``python -m data_builders.NAME ...``.
"""

BUILDERS = ("maze", "vsp", "jigsaw", "depth", "count")
CONVERTERS = ("mirage", "monet", "zebra_cot", "llava")
TOOLS = ("validate", "preview")
