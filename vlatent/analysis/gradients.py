"""How hard each named loss pulls on the weights. The Trainer clips the gradient of the weighted sum to
``max_grad_norm``: one auxiliary loss whose gradient is ten times CE's then cuts CE's update ten times, and CE stalls
while the logged losses look healthy (CoCoVa's contrastive loss on the tiny base did exactly that)."""

from __future__ import annotations

import torch


def loss_gradient_norms(model, batch: dict) -> dict[str, float]:
    """L2 norm over ``model``'s trainable parameters of the gradient of each named loss times its weight, on one
    collated ``batch``, and of their sum (``"total"``: the Trainer's ``grad_norm`` before clipping). Runs one training
    forward (a method's training-time state, e.g. CoCoVa's queue of negatives, advances as in a step); leaves no
    ``.grad`` behind."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("loss_gradient_norms: the model has no trainable parameter")
    was_training = model.training
    model.train()
    try:
        out = model(batch)
        weights = model.method.loss_weights()
        terms = {name: weights.get(name, 1.0) * value for name, value in out.losses.items()}
        terms["total"] = out.loss
        norms = {}
        for i, (name, loss) in enumerate(terms.items()):
            if not loss.requires_grad:  # a constant (e.g. no latent segment in the batch)
                norms[name] = 0.0
                continue
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(terms) - 1, allow_unused=True)
            norms[name] = float(sum(g.float().pow(2).sum() for g in grads if g is not None) ** 0.5)
        return norms
    finally:
        model.train(was_training)
