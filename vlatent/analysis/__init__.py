"""Analyses of trained models' latents: interventions (does the answer depend on the latents?)."""

from .intervene import MODES, InterventionResult, LatentReplacer, answer_text, intervene

__all__ = ["MODES", "InterventionResult", "LatentReplacer", "answer_text", "intervene"]
