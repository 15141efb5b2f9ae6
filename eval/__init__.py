"""Evaluation app: ``run.py`` (the ``vlatent eval`` entry point and ``evaluate``), ``benchmarks.py`` (loaders, prompts,
judging, scores) and ``report.py`` (report.md and the bar chart). Scoring rules live in ``vlatent.scoring``."""
