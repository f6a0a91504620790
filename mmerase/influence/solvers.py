"""Solvers for (H + λI) δ = b behind one interface: ``SOLVERS[name](problem, config) -> SolverOutput``
(the registry in :mod:`.registry`; each solver below registers itself).

``problem`` supplies products over the whole curvature set (``matvec``), unbiased mini-batch products
(``minibatch_matvec``) and the relative residual on a fixed sample set (``residual``); a solver never sees
the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from . import vectors as V
from .config import SolverConfig
from .errors import InfluenceError, NotPositiveDefiniteError, SolverDivergedError
from .registry import register_solver


class Preconditioner(Protocol):
    """M ≈ (H + λI)⁻¹, symmetric positive definite (see :mod:`.precondition`)."""

    def apply(self, r: V.Vec) -> V.Vec: ...


class LinearProblem(Protocol):
    b: V.Vec
    damping: float
    n_params: int
    product_samples: int  # samples pushed through curvature products so far
    preconditioner: Preconditioner | None  # optional; problems without the attribute have none

    def matvec(self, v: V.Vec) -> V.Vec: ...

    def minibatch_matvec(self, v: V.Vec) -> V.Vec: ...

    def residual(self, x: V.Vec) -> float: ...

    # optional: (H+λI) v over the residual set; solvers fall back to matvec without it
    # def residual_matvec(self, v: V.Vec) -> V.Vec: ...


@dataclass
class SolverOutput:
    x: V.Vec
    residual: float
    converged: bool
    steps: int
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class _Tracker:
    """Residual history, progress bar and the NaN/divergence guard shared by all solvers."""

    def __init__(self, problem: LinearProblem, config: SolverConfig, total: int, desc: str) -> None:
        self.problem, self.config, self.t0 = problem, config, time.perf_counter()
        self.history: list[dict] = []
        self.bar = tqdm(total=total, desc=desc, disable=(None if config.progress is None else not config.progress),
                        leave=False, dynamic_ncols=True)

    def record(self, step: int, residual: float) -> None:
        if not math.isfinite(residual):
            self.bar.close()
            raise SolverDivergedError(
                f"{self.config.method} solver produced a non-finite residual at step {step}: "
                f"try more damping (λ={self.config.damping}) or a smaller lr/step"
            )
        self.history.append({"step": step, "residual": residual, "product_samples": self.problem.product_samples,
                             "time": time.perf_counter() - self.t0})
        self.bar.set_postfix(residual=f"{residual:.3e}")

    def close(self) -> None:
        self.bar.close()


def _check_finite(x: V.Vec, method: str, step: int, hint: str) -> None:
    if not V.is_finite(x):
        raise SolverDivergedError(f"{method} solver produced NaN/inf at step {step}; {hint}")


def _preconditioner(problem: LinearProblem) -> Preconditioner | None:
    return getattr(problem, "preconditioner", None)


@register_solver("cg")
def solve_cg(problem: LinearProblem, config: SolverConfig) -> SolverOutput:
    """(Preconditioned) conjugate gradient on exact products over the curvature set; stops on non-positive
    curvature. With a preconditioner M it runs PCG: the same exact products and the same stopping rule on the
    unpreconditioned residual ‖(H+λI)x − b‖/‖b‖, so M changes the number of steps, not the answer.

    The residual recurrence drifts from the true residual in float32: when it says ``tol`` is reached but the true
    residual does not, CG restarts from x with the true residual (at most :data:`CG_RESTARTS` times, within
    ``max_steps``), so a converged answer meets ``tol`` itself."""
    b, bn = problem.b, V.norm(problem.b)
    m = _preconditioner(problem)
    tr = _Tracker(problem, config, config.max_steps, "pcg" if m is not None else "cg")
    tr.record(0, 1.0)
    x, r, step, restarts = V.zeros_like(b), [t.clone() for t in b], 0, 0
    try:
        while True:
            x, step, converged = _cg_pass(problem, config, m, x, r, bn, step, tr)
            _check_finite(x, "cg", step, "increase damping")
            res = problem.residual(x)  # the true residual, reported
            if not converged or res < config.tol or step >= config.max_steps or restarts == CG_RESTARTS:
                break
            r, restarts = V.sub(b, problem.matvec(x)), restarts + 1
    finally:
        tr.close()
    info = {"preconditioned": m is not None, "restarts": restarts}
    return SolverOutput(x, res, converged and res < max(config.tol, 10 * config.tol), step, tr.history, info)


CG_RESTARTS = 2


def _cg_pass(problem: LinearProblem, config: SolverConfig, m: Preconditioner | None, x: V.Vec, r: V.Vec, bn: float,
             step: int, tr: _Tracker) -> tuple[V.Vec, int, bool]:
    """CG steps from ``x`` with residual ``r`` until the recurrence's relative residual is below ``tol`` (True) or
    ``max_steps`` are spent in all (False); returns x, the steps taken so far and whether it converged."""
    z = r if m is None else m.apply(r)
    p, rz = [t.clone() for t in z], V.dot(r, z)
    if m is not None and not rz > 0:
        raise InfluenceError(f"the preconditioner is not positive definite (rᵀMr = {rz:.3e}); rebuild it")
    while step < config.max_steps:
        step += 1
        ap = problem.matvec(p)
        pap = V.dot(p, ap)
        if not math.isfinite(pap):
            raise SolverDivergedError(f"cg: non-finite product pᵀ(H+λI)p at step {step}")
        if pap <= 0:
            raise NotPositiveDefiniteError(
                f"cg met non-positive curvature at step {step}: pᵀ(H+λI)p = {pap:.3e} ≤ 0 with damping "
                f"λ={problem.damping:g}, so H+λI is not positive definite and (H+λI)δ=b has no minimiser "
                "that CG can find. Increase --damping, or use a PSD curvature ('ggn' or 'fisher').",
                rayleigh=pap / V.dot(p, p) - problem.damping,
            )
        alpha = rz / pap
        x = V.axpy(alpha, p, x)
        r = V.axpy(-alpha, ap, r)
        rel = V.norm(r) / bn
        tr.record(step, rel)
        tr.bar.update(1)
        if rel < config.tol:
            return x, step, True
        z = r if m is None else m.apply(r)
        rz_new = V.dot(r, z)
        p = V.axpy(rz_new / rz, p, z)
        rz = rz_new
    return x, step, False


def _auto_lr(problem: LinearProblem) -> float:
    """0.1 × the RMS entry of the steepest-descent (Cauchy) step α·b, α = bᵀb / bᵀ(H+λI)b."""
    b = problem.b
    bab = V.dot(b, problem.minibatch_matvec(b))
    alpha = V.dot(b, b) / bab if bab > 0 else 1.0 / max(problem.damping, 1.0)
    return 0.1 * abs(alpha) * V.norm(b) / math.sqrt(problem.n_params)


@register_solver("stochastic")
def solve_stochastic(problem: LinearProblem, config: SolverConfig) -> SolverOutput:
    """Adam on F(δ) = ½δᵀ(H+λI)δ − bᵀδ with mini-batch products; cosine-decayed step so the noise dies out.

    With a preconditioner M it runs preconditioned stochastic gradient descent instead (see
    :func:`_solve_stochastic_preconditioned`)."""
    if _preconditioner(problem) is not None:
        return _solve_stochastic_preconditioned(problem, config)
    lr = config.lr if config.lr is not None else _auto_lr(problem)
    b = problem.b
    x, m, s = V.zeros_like(b), V.zeros_like(b), V.zeros_like(b)
    beta1, beta2, eps = 0.9, 0.999, 1e-12
    tr = _Tracker(problem, config, config.max_steps, "stochastic")
    tr.record(0, 1.0)
    converged, res, step = False, 1.0, 0
    try:
        for step in range(1, config.max_steps + 1):
            g = V.sub(problem.minibatch_matvec(x), b)
            lr_t = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / config.max_steps))
            for xi, mi, si, gi in zip(x, m, s, g):
                mi.mul_(beta1).add_(gi, alpha=1 - beta1)
                si.mul_(beta2).addcmul_(gi, gi, value=1 - beta2)
                mhat = mi / (1 - beta1**step)
                shat = si / (1 - beta2**step)
                xi.sub_(lr_t * mhat / (shat.sqrt() + eps))
            _check_finite(x, "stochastic", step, "lower lr or increase damping")
            tr.bar.update(1)
            if step % config.eval_every == 0 or step == config.max_steps:
                res = problem.residual(x)
                tr.record(step, res)
                if res > config.divergence_factor:
                    raise SolverDivergedError(
                        f"stochastic solver diverged: residual {res:.3e} at step {step} "
                        f"(guard {config.divergence_factor:g}); lower lr (now {lr:.3e}) or increase damping"
                    )
                if res < config.tol:
                    converged = True
                    break
    finally:
        tr.close()
    _refuse_worse_than_zero(res, "stochastic", f"lower lr (now {lr:.3e}), raise damping, or use 'cg'")
    return SolverOutput(x, res, converged, step, tr.history, {"lr": lr})


def _refuse_worse_than_zero(res: float, method: str, hint: str) -> None:
    """A stochastic solve that ends farther from the solution than δ = 0 (relative residual ≥ 1) has diverged in
    effect, even below the divergence guard: never return it."""
    if not res < 1.0:
        raise SolverDivergedError(f"{method} solver ended at relative residual {res:.3e} ≥ 1, no better than no "
                                  f"update; {hint}")


def _solve_stochastic_preconditioned(problem: LinearProblem, config: SolverConfig) -> SolverOutput:
    """x₀ = M b, then x ← x − η_t M (Ĥ_B x + λx − b) with mini-batch products Ĥ_B and a cosine-decayed step
    η_t = lr·½(1 + cos(π t/T)); the iterates of the last half are averaged (Polyak–Ruppert), which removes most
    of the mini-batch noise. Default lr = batch/curvature-set size (at most 1): a mini-batch's curvature can be
    that many times the mean's in a direction few samples bend, where M is large, and a larger step diverges."""
    m = _preconditioner(problem)
    assert m is not None
    n_curv = len(getattr(problem, "curv_idx", ())) or config.batch_size
    lr = min(1.0, config.batch_size / n_curv) if config.lr is None else config.lr
    b = problem.b
    x = m.apply(b)
    avg, n_avg = None, 0
    tr = _Tracker(problem, config, config.max_steps, "stochastic (preconditioned)")
    tr.record(0, 1.0)
    converged, res, step = False, 1.0, 0
    try:
        for step in range(1, config.max_steps + 1):
            g = V.sub(problem.minibatch_matvec(x), b)
            lr_t = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / config.max_steps))
            x = V.axpy(-lr_t, m.apply(g), x)
            _check_finite(x, "stochastic", step, "lower lr or increase damping")
            if step > config.max_steps // 2:
                n_avg += 1
                avg = [t.clone() for t in x] if avg is None else V.axpy(1.0 / n_avg, V.sub(x, avg), avg)
            tr.bar.update(1)
            if step % config.eval_every == 0 or step == config.max_steps:
                est = avg if avg is not None else x
                res = problem.residual(est)
                tr.record(step, res)
                if res > config.divergence_factor:
                    raise SolverDivergedError(
                        f"preconditioned stochastic solver diverged: residual {res:.3e} at step {step} "
                        f"(guard {config.divergence_factor:g}); lower lr (now {lr:g}) or increase damping")
                if res < config.tol:
                    converged = True
                    break
    finally:
        tr.close()
    _refuse_worse_than_zero(res, "preconditioned stochastic", f"lower lr (now {lr:g}) or raise damping, or use 'cg'")
    out = avg if avg is not None else x
    return SolverOutput(out, res, converged, step, tr.history, {"lr": lr, "preconditioned": True,
                                                                "averaged_steps": n_avg})


def _power_iteration(problem: LinearProblem, iters: int = 20, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of H+λI from products over the curvature set."""
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in problem.b]
    lam = 0.0
    for _ in range(iters):
        vn = V.norm(v)
        v = V.scale(1.0 / vn, v)
        av = problem.matvec(v)
        lam = V.dot(v, av)
        v = av
    return abs(lam)


@register_solver("lissa")
def solve_lissa(problem: LinearProblem, config: SolverConfig) -> SolverOutput:
    """LiSSA: h ← b + (I − (H_B+λI)/s) h, answer h/s (the 1/s correction), with a divergence guard.

    Converges when the eigenvalues of (H+λI)/s lie in (0, 2); a negative eigenvalue (an indefinite H that
    damping did not fix) or too small a scale makes it diverge, which is reported, never returned.
    """
    scale_ = config.lissa_scale
    if scale_ is None:
        scale_ = 1.1 * _power_iteration(problem, seed=config.seed)
    b, bn = problem.b, V.norm(problem.b)
    h = [t.clone() for t in b]
    tr = _Tracker(problem, config, config.max_steps, "lissa")
    tr.record(0, 1.0)
    converged, res, step = False, 1.0, 0
    hint = f"increase lissa_scale (now {scale_:.3e}) or damping (λ={problem.damping:g})"
    try:
        for step in range(1, config.max_steps + 1):
            ah = problem.minibatch_matvec(h)
            h = [bi + hi - ai / scale_ for bi, hi, ai in zip(b, h, ah)]
            _check_finite(h, "lissa", step, hint)
            if V.norm(h) > 1e12 * bn:
                raise SolverDivergedError(f"lissa diverged at step {step} (‖h‖ grew without bound); {hint}")
            tr.bar.update(1)
            if step % config.eval_every == 0 or step == config.max_steps:
                res = problem.residual(V.scale(1.0 / scale_, h))
                tr.record(step, res)
                if res > config.divergence_factor:
                    raise SolverDivergedError(f"lissa diverged: residual {res:.3e} at step {step}; {hint}")
                if res < config.tol:
                    converged = True
                    break
    finally:
        tr.close()
    return SolverOutput(V.scale(1.0 / scale_, h), res, converged, step, tr.history, {"lissa_scale": scale_})


@register_solver("dense")
def solve_dense(problem: LinearProblem, config: SolverConfig) -> SolverOutput:
    """Form H+λI column by column (one product per parameter) and solve it directly in float64."""
    p = problem.n_params
    if p > config.dense_max_params:
        raise InfluenceError(
            f"the 'dense' solver forms a {p}×{p} matrix ({p} products); this model has {p} trainable "
            f"parameters, above dense_max_params={config.dense_max_params}. Use 'cg' instead."
        )
    like = problem.b
    cols = []
    tr = _Tracker(problem, config, p, "dense")
    try:
        for i in range(p):
            e = torch.zeros(p, dtype=torch.float64)
            e[i] = 1.0
            cols.append(V.flatten(problem.matvec(V.unflatten(e, like))).double())
            tr.bar.update(1)
    except BaseException:
        tr.close()
        raise
    a = torch.stack(cols, dim=1)
    a = 0.5 * (a + a.T)
    x_flat = torch.linalg.solve(a, V.flatten(like).double())
    x = V.unflatten(x_flat, like)
    _check_finite(x, "dense", p, "H+λI is singular: increase damping")
    res = float(torch.linalg.vector_norm(a @ x_flat - V.flatten(like).double()) / V.norm(like))
    tr.record(p, res)
    tr.close()
    eig = torch.linalg.eigvalsh(a)
    return SolverOutput(x, res, True, p, tr.history,
                        {"min_eigenvalue": float(eig[0]), "max_eigenvalue": float(eig[-1])})


@register_solver("prepared")
def solve_prepared(problem: LinearProblem, config: SolverConfig) -> SolverOutput:
    """δ = α M b from a preparation's preconditioner M: one preconditioned step from 0. For an M whose scale is
    estimated (``trusted_scale`` false: diagonal, K-FAC, EK-FAC) α = bᵀMb / (Mb)ᵀ(H+λI)(Mb) minimises
    ½δᵀ(H+λI)δ − bᵀδ along Mb, so an M that overestimates (H+λI)⁻¹ somewhere cannot overshoot (α = 1 when M is
    exact); an M built from exact eigenpairs (low-rank) keeps α = 1, which beats an α measured on a small residual
    set (measured: benchmarks/request_reuse.md). One product, over the residual set: α and the reported residual
    (make it cheap with ``residual_samples``). No solve, so approximate; 'cg' with the same preconditioner gives
    the exact answer."""
    m = _preconditioner(problem)
    if m is None:
        raise InfluenceError("solver 'prepared' answers from a preparation: pass preconditioner= (or --prepared)")
    matvec = getattr(problem, "residual_matvec", None) or problem.matvec
    b = problem.b
    tr = _Tracker(problem, config, 1, "prepared")
    try:
        x = m.apply(b)
        _check_finite(x, "prepared", 1, "rebuild the preparation")
        ax = matvec(x)
        curv = V.dot(x, ax)
        alpha = 1.0 if getattr(m, "trusted_scale", False) or not curv > 0 else V.dot(b, x) / curv
        x = V.scale(alpha, x)
        res = V.norm(V.axpy(alpha, ax, V.scale(-1.0, b))) / V.norm(b)
        tr.record(1, res)
    finally:
        tr.close()
    return SolverOutput(x, res, res < config.tol, 1, tr.history, {"preconditioned": True, "step": alpha})
