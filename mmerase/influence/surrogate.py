"""A refinement whose steps cost the same whatever the training set's size: the edited objective with its training
term replaced by a quadratic model on a fixed sub-sample S (see docs/design.md, "Refinement").

    S(x) = ½ xᵀ(H_S + λI)x − g_oldᵀx + (1/n) Σ_E L(z_new; θ̂ + x),    g_old = (1/n) Σ_E ∇L(z_old; θ̂)

The old samples' loss cancels exactly between the training term and the edit term, so only their gradient at θ̂
remains; the new samples stay exact. x lives in a subspace grown by one (preconditioned) direction at a time; each
direction's (H_S + λI) product is stored, so the quadratic term is exact on the subspace and a step costs one
product over S, one gradient of the new samples and a few of their forwards — nothing over the other n − |S|
samples. :meth:`SubspaceSurrogate.krylov` solves the plain influence update (H_S + λI)x = g_old − g_new(θ̂) in a
preconditioned Krylov subspace; :meth:`SubspaceSurrogate.step` re-linearises the new samples at x, solves the
Galerkin system and line-searches S. Measured in ``benchmarks/subspace_surrogate.py``.

:class:`AnchoredSurrogate` keeps the same subspace and products as its Newton model but replaces the quadratic by
the retained members S_R of S themselves, anchored at θ̂ (a control variate: the retained loss's gradient at θ̂,
−g_old, is known exactly, so only the change of the sampled gradient since θ̂ is estimated from S_R):

    A(x) = w [L̄_{S_R}(θ̂ + x) − L̄_{S_R}(θ̂) − ∇L̄_{S_R}(θ̂)ᵀx] + ½λ‖x‖² − g_oldᵀx + (1/n) Σ_E L(z_new; θ̂ + x)

(w = the retained share of the training set). A removal then moves beyond the first Newton step, as the
retrained adapter does, at |S| passes per step whatever n is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import vectors as V
from .edits import Edit
from .problem import Indexed

#: the line search halves the step down to this fraction of the Galerkin step, then keeps x
MIN_STEP = 1 / 16


class SubspaceSurrogate:
    """S(x) on ``engine``'s adapter (θ̂ on entry): the stored subspace, its products and the edits' samples.

    ``subset``: training indices of S (None: the whole training set); ``damping``: λ; ``precondition``: v ↦ M v
    applied to every new direction (e.g. a preparation's ``apply``; identity when None)."""

    def __init__(self, engine: Any, edits: Sequence[Edit], subset: Sequence[int] | None, damping: float,
                 precondition: Callable[[V.Vec], V.Vec] | None = None, curvature: str = "ggn",
                 batch_size: int = 128) -> None:
        self.engine, self.n, self.subset, self.damping = engine, engine.n, subset, float(damping)
        self.precondition = precondition or (lambda v: v)
        self.curvature, self.batch_size = curvature, batch_size
        self.saved = [p.detach().clone() for p in engine.params]
        self.new = [e.new for e in edits if e.new is not None]
        old = [e.old for e in edits if e.old is not None]
        with engine.inference_mode():
            self.g_old = V.scale(1 / self.n, engine.gradient_sum(old, batch_size)) if old else V.zeros_like(self.saved)
        self.basis: list[torch.Tensor] = []  # orthonormal, flat
        self.products: list[torch.Tensor] = []  # (H_S + λI) basis

    def extend(self, d: V.Vec) -> None:
        """Add d, orthogonalised against the subspace, with its product (skipped when nothing of it is new)."""
        f = V.flatten(d)
        for q in self.basis:
            f = f - (q @ f) * q
        if float(f.norm()) < 1e-12:
            return
        f = f / f.norm()
        self.engine.set_parameters(self.saved, None)
        v = V.unflatten(f, self.saved)
        hv = V.axpy(self.damping, v, self.engine.product(v, self.curvature, self.subset, self.batch_size))
        self.basis.append(f)
        self.products.append(V.flatten(hv))

    def galerkin(self, rhs: V.Vec) -> V.Vec:
        """argmin over the subspace of ½yᵀ(H_S + λI)y − rhsᵀy."""
        q, aq = torch.stack(self.basis), torch.stack(self.products)
        t = q @ aq.T
        c = torch.linalg.solve((0.5 * (t + t.T)).double(), (q @ V.flatten(rhs)).double()).to(q.dtype)
        return V.unflatten(q.T @ c, self.saved)

    def curvature_times(self, x: V.Vec) -> V.Vec:
        """(H_S + λI) x for x in the subspace."""
        q, aq = torch.stack(self.basis), torch.stack(self.products)
        return V.unflatten(aq.T @ (q @ V.flatten(x)), self.saved)

    def new_gradient(self, x: V.Vec) -> V.Vec:
        """(1/n) Σ_E ∇L(z_new; θ̂ + x) (the model is left at θ̂ + x)."""
        self.engine.set_parameters(self.saved, x)
        if not self.new:
            return V.zeros_like(self.saved)
        with self.engine.inference_mode():
            return V.scale(1 / self.n, self.engine.gradient_sum(self.new, self.batch_size))

    def value(self, x: V.Vec) -> float:
        """S(x) for x in the subspace (the model is left at θ̂ + x)."""
        self.engine.set_parameters(self.saved, x)
        new = 0.0
        if self.new:
            with torch.no_grad(), self.engine.inference_mode():
                new = self.engine.loss_sum(self.new, self.batch_size) / self.n
        return 0.5 * V.dot(x, self.curvature_times(x)) - V.dot(self.g_old, x) + new

    def krylov(self, directions: int) -> V.Vec:
        """The plain influence update on the sub-sampled curvature, from ``directions`` preconditioned residuals."""
        rhs = V.sub(self.g_old, self.new_gradient(V.zeros_like(self.saved)))
        residual, y = rhs, V.zeros_like(self.saved)
        for _ in range(directions):
            self.extend(self.precondition(residual))
            y = self.galerkin(rhs)
            residual = V.sub(rhs, self.curvature_times(y))
        return y

    def step(self, x: V.Vec) -> V.Vec:
        """Grow the subspace by the preconditioned gradient of S at x, solve the re-linearised Galerkin system and
        line-search S between x and its solution; x itself when no trial step lowers S."""
        rhs = V.sub(self.g_old, self.new_gradient(x))
        self.extend(self.precondition(V.sub(self.curvature_times(x), rhs)))
        y = self.galerkin(rhs)
        f_x, t = self.value(x), 1.0
        while t >= MIN_STEP:
            trial = V.axpy(t, V.sub(y, x), x)
            if self.value(trial) < f_x:
                return trial
            t /= 2
        return x

    def restore(self) -> None:
        """Put θ̂ back in the model."""
        self.engine.set_parameters(self.saved, None)


class AnchoredSurrogate(SubspaceSurrogate):
    """A(x) (module docstring) on the same subspace: the quadratic's Galerkin solve as the step's Newton model, the
    sampled retained loss in the line search. S's members that are the edits' old samples are left out of S_R."""

    def __init__(self, engine: Any, edits: Sequence[Edit], subset: Sequence[int] | None, damping: float,
                 precondition: Callable[[V.Vec], V.Vec] | None = None, curvature: str = "ggn",
                 batch_size: int = 128) -> None:
        super().__init__(engine, edits, subset, damping, precondition, curvature, batch_size)
        old = [e.old for e in edits if e.old is not None]
        old_ids = {getattr(z, "id", None) for z in old} - {None}
        members = range(engine.n) if subset is None else subset
        keep = [i for i in members if not any(engine.train_set[i] is z for z in old)
                and getattr(engine.train_set[i], "id", None) not in old_ids]
        self.retained = Indexed(engine.train_set, keep)
        self.weight = (self.n - len(old)) / self.n
        self.anchor = self.sampled_loss(None)
        self.anchor_gradient = self.sampled_gradient(None)
        self.last: tuple[V.Vec, float] | None = None

    def sampled_loss(self, x: V.Vec | None) -> float:
        """L̄_{S_R}(θ̂ + x) (the model is left there)."""
        self.engine.set_parameters(self.saved, x)
        with torch.no_grad(), self.engine.inference_mode():
            return self.engine.loss_sum(self.retained, self.batch_size) / len(self.retained)

    def sampled_gradient(self, x: V.Vec | None) -> V.Vec:
        """∇L̄_{S_R}(θ̂ + x) (the model is left there)."""
        self.engine.set_parameters(self.saved, x)
        with self.engine.inference_mode():
            total = self.engine.gradient_sum(self.retained, self.batch_size, "training sample")
        return V.scale(1 / len(self.retained), total)

    def value(self, x: V.Vec) -> float:
        """A(x) (the model is left at θ̂ + x)."""
        if self.last is not None and self.last[0] is x:
            return self.last[1]
        train = self.weight * (self.sampled_loss(x) - self.anchor - V.dot(self.anchor_gradient, x))
        quad = 0.5 * self.damping * V.dot(x, x) - V.dot(self.g_old, x)
        out = train + quad
        if self.new:
            with torch.no_grad(), self.engine.inference_mode():
                out += self.engine.loss_sum(self.new, self.batch_size) / self.n
        self.last = (x, out)
        return out

    def gradient(self, x: V.Vec) -> V.Vec:
        """∇A(x)."""
        change = V.sub(self.sampled_gradient(x), self.anchor_gradient)
        g = V.axpy(self.damping, x, V.scale(self.weight, change))
        return V.add(V.sub(g, self.g_old), self.new_gradient(x))

    def step(self, x: V.Vec) -> V.Vec:
        """Grow the subspace by the preconditioned gradient of A at x, take the Galerkin Newton step on the stored
        curvature and line-search A along it; x itself when no trial step lowers A."""
        g = self.gradient(x)
        self.extend(self.precondition(g))
        d = self.galerkin(V.scale(-1.0, g))
        f_x, t = self.value(x), 1.0
        while t >= MIN_STEP:
            trial = V.axpy(t, d, x)
            if self.value(trial) < f_x:
                return trial
            t /= 2
        return x


__all__ = ["AnchoredSurrogate", "MIN_STEP", "SubspaceSurrogate"]
