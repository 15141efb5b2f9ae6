"""Training entry points (apps): `python -m train sft --config RECIPE` or `vlatent train sft ...`."""
