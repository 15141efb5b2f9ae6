"""Analyses of trained models: latent interventions (does the answer depend on the latents?), latent specificity (do
they differ between examples, toward their own targets?), trace checks (which step of a written reasoning trace goes
wrong?) and each loss's gradient norm (which loss drives training?)."""

from .gradients import loss_gradient_norms
from .intervene import MODES, InterventionResult, LatentReplacer, answer_text, intervene
from .specificity import Specificity, generated_specificity, latent_specificity
from .trace import TraceCheck, check_trace, trace_scores

__all__ = ["MODES", "InterventionResult", "LatentReplacer", "Specificity", "TraceCheck", "answer_text", "check_trace",
           "generated_specificity", "intervene", "latent_specificity", "loss_gradient_norms", "trace_scores"]
