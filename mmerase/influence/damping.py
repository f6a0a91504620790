"""Automatic damping: λ from the curvature's own spectrum.

A LoRA fine-tune is non-convex and stops short of an exact optimum, so the curvature H is indefinite (exact Hessian)
or nearly singular (GGN, Fisher), and an undamped or lightly damped solve walks far along flat directions where the
first-order model no longer holds. λ must therefore be set relative to the scale of H, which differs by orders of
magnitude between models, losses and adapters. The rule here:

    λ = damping_scale · μ_max(C),   raised to PD_MARGIN · (−μ_min) when C shows negative curvature,

with μ_max, μ_min the extreme Ritz values of ``damping_steps`` Lanczos steps on the curvature C over the training (or
curvature) set — extreme eigenvalues are what Lanczos finds first, so a few steps suffice. A Ritz value lies inside
the spectrum, so μ_min can miss the true bottom: the conjugate-gradient solver's negative-curvature certificate then
raises λ further (see :func:`raised_damping`), and every increase is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import vectors as V
from .lanczos import lanczos

#: λ is at least this multiple of the most negative Ritz value, so that H + λI is positive definite with room to spare
PD_MARGIN = 2.0
#: how many times a solve may raise an automatic λ after CG met non-positive curvature
MAX_INCREASES = 4


def estimate_damping(matvec: Callable[[V.Vec], V.Vec], like: V.Vec, scale: float, steps: int, seed: int = 0,
                     progress: bool | None = None) -> tuple[float, dict[str, Any]]:
    """λ = scale · μ_max, raised for negative curvature; returns (λ, what the estimate saw)."""
    values, _, residuals, info = lanczos(matvec, like, steps, seed=seed, progress=progress)
    top, bottom = float(values[0]), float(values[-1])
    if top == 0 and bottom == 0:
        raise ValueError("the curvature is zero along every direction tried: the loss does not depend on the "
                         "trainable parameters here; set damping explicitly")
    lam, rule = damping_rule(scale, top, bottom)
    return lam, {"rule": rule, "value": lam, "scale": scale, "top_eigenvalue": top, "bottom_ritz_value": bottom,
                 "top_residual": float(residuals[0]), "lanczos_steps": info["lanczos_steps"], "increases": []}


def damping_rule(scale: float, top: float, bottom: float) -> tuple[float, str]:
    """λ for the extreme Ritz values (top, bottom) of the curvature, and the rule that set it."""
    lam = scale * max(top, 0.0)
    if bottom < 0 and PD_MARGIN * -bottom > lam:
        return PD_MARGIN * -bottom, f"{PD_MARGIN:g} × −(most negative Ritz value)"
    return lam, f"{scale:g} × top eigenvalue"


def raised_damping(damping: float, rayleigh: float) -> float:
    """A larger λ after CG met pᵀ(H + λI)p ≤ 0: the direction p proves μ_min(H) ≤ pᵀHp/pᵀp = ``rayleigh`` < −λ, so
    λ must exceed −rayleigh; take twice that (and at least double the old λ)."""
    return max(2.0 * damping, PD_MARGIN * -rayleigh)
