"""Dense float64 references built by hand from forward-mode Jacobians, not by the engine's products."""

from __future__ import annotations

import torch
from torch.func import functional_call, jacfwd

from mmerase.influence import vectors as V
from mmerase.models.base import IGNORE_INDEX


def dense_ggn(bundle, engine, samples) -> torch.Tensor:
    """(1/B) Σ_b (1/T_b) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t over response tokens, J_t = ∂logits_t/∂θ by jacfwd:
    the Gauss-Newton matrix of the per-sample-mean loss over ``samples``, derived by hand."""
    batch = engine.collate(samples)
    inputs = {**bundle.loss_fn.model_inputs(bundle.model, batch), "use_cache": False}
    like = [p.detach() for p in engine.params]
    frozen = {n: p for n, p in bundle.model.named_parameters() if not p.requires_grad}

    def logits_of(flat):
        params = dict(zip(engine.names, V.unflatten(flat, like)))
        return functional_call(bundle.model, {**frozen, **params}, args=(), kwargs=inputs).logits

    flat = V.flatten(like)
    jac = jacfwd(logits_of)(flat)  # [B, L, vocab, P]
    logits = logits_of(flat).detach()
    labels = batch["labels"]
    ggn = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    for b in range(labels.shape[0]):
        positions = [t for t in range(labels.shape[1] - 1) if labels[b, t + 1] != IGNORE_INDEX]
        for t in positions:
            p = torch.softmax(logits[b, t], dim=-1)
            ggn += jac[b, t].T @ (torch.diag(p) - torch.outer(p, p)) @ jac[b, t] / len(positions)
    return ggn / labels.shape[0]
