"""The Lanczos iteration on a curvature operator: its extreme eigenpairs (for automatic damping and the low-rank
preconditioner) and, started from b, CG's Krylov answers for every damping at once (multi-shift)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from . import vectors as V
from .errors import InfluenceError


def lanczos(matvec: Callable[[V.Vec], V.Vec], like: Sequence[torch.Tensor], steps: int, seed: int = 0,
            progress: bool | None = None, start: V.Vec | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``steps`` Lanczos iterations (full reorthogonalisation) → Ritz values (descending), Ritz vectors as rows and
    each pair's residual norm ‖C y − θ y‖ = β_k |s_kj| (small: a converged eigenpair).

    Starts from ``start`` (default: a seeded random vector). Started from b, the Krylov space is CG's, so
    ``info['tridiagonal']`` (T_k, its eigenvectors S in the Ritz order, β_k) gives the k-step CG answer for every
    damping λ at once: see :func:`shifted_solutions`.
    Stops early when the Krylov space is exhausted (an invariant subspace: the Ritz pairs are then exact).
    """
    n = sum(t.numel() for t in like)
    steps = min(steps, n)
    g = torch.Generator().manual_seed(seed)
    dtype = like[0].dtype
    if start is None:
        q = torch.randn(n, generator=g, dtype=torch.float64).to(device=like[0].device, dtype=dtype)
    else:
        q = V.flatten(start).to(device=like[0].device, dtype=dtype)
    q = q / q.norm()
    basis, alphas, betas = [q], [], []
    bar = tqdm(total=steps, desc="lanczos", leave=False, dynamic_ncols=True,
               disable=(None if progress is None else not progress))
    try:
        for j in range(steps):
            w = V.flatten(matvec(V.unflatten(basis[j], like)))
            if not bool(torch.isfinite(w).all()):
                raise InfluenceError(f"lanczos: the curvature product returned NaN/inf at step {j + 1}")
            a = float(w @ basis[j])
            alphas.append(a)
            q_mat = torch.stack(basis)
            w = w - q_mat.T @ (q_mat @ w)  # full reorthogonalisation (twice is enough)
            w = w - q_mat.T @ (q_mat @ w)
            bar.update(1)
            b = float(w.norm())
            if j == steps - 1 or b <= 1e-10 * max(abs(a), 1e-30):
                last_beta = b if b > 1e-10 * max(abs(a), 1e-30) else 0.0
                break
            betas.append(b)
            basis.append(w / b)
    finally:
        bar.close()
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)  # the small tridiagonal problem stays on the CPU, in float64
    order = torch.argsort(theta, descending=True)
    theta, s = theta[order], s[:, order]
    q_mat = torch.stack(basis[:k]).to(torch.float64)
    ritz = (s.T.to(q_mat.device) @ q_mat).to(dtype)  # Ritz vectors on the basis' device (the model's)
    residuals = last_beta * s[-1].abs()
    return theta.to(dtype), ritz, residuals, {"lanczos_steps": k, "ritz_max": float(theta[0]),
                                              "ritz_min": float(theta[-1]), "tridiagonal": (t, s, last_beta)}


def shifted_solutions(ritz: torch.Tensor, tridiagonal: tuple[torch.Tensor, torch.Tensor, float], b_norm: float,
                      dampings: Sequence[float]) -> list[tuple[torch.Tensor, float]]:
    """From a Lanczos run started at b: for each λ the k-step Krylov (Galerkin) solution of (C + λI)x = b — what
    k steps of CG would return — flattened, with its relative residual β_k |e_kᵀ z| / ‖b‖ (Krylov spaces are
    shift-invariant, so one run serves every λ; "multi-shift CG"). Needs C + λI non-singular on the Krylov space."""
    t, s, last_beta = tridiagonal
    q = s.to(device=ritz.device, dtype=ritz.dtype) @ ritz  # the Lanczos basis as rows (ritz = Sᵀ Q)
    e1 = torch.zeros(t.shape[0], dtype=torch.float64)
    e1[0] = b_norm
    out = []
    for lam in dampings:
        z = torch.linalg.solve(t + lam * torch.eye(t.shape[0], dtype=torch.float64), e1)
        x = q.T.to(torch.float64) @ z.to(q.device)
        out.append((x.to(ritz.dtype), last_beta * float(z[-1].abs()) / b_norm))
    return out
