"""One solve's state and its linear problems: (H + λI) restricted to the curvature set, product counting, and the
damped solve that raises an automatic λ when CG meets negative curvature.

:class:`SolveState` is built by :meth:`InfluenceEngine.solve <mmerase.influence.engine.InfluenceEngine.solve>` for
one call and passed to the solve and the refinement (:mod:`.refine`), so the engine keeps no per-call state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import vectors as V
from .config import SolverConfig
from .curvature import Curvature
from .damping import MAX_INCREASES, raised_damping
from .errors import NotPositiveDefiniteError
from .registry import SOLVERS
from .solvers import Preconditioner, SolverOutput


class Indexed:
    """A read-only view ``data[indices]`` of a sequence (a subset of the training set without copying it)."""

    def __init__(self, data: Any, indices: list[int]) -> None:
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.data[self.indices[i]]


@dataclass
class SolveState:
    """What one solve works with. ``config`` carries the λ in use (a number); ``samples`` counts every sample
    pushed through a curvature product so far; ``damping_info`` is how an automatic λ was found and raised."""

    engine: Any
    curvature: Curvature
    config: SolverConfig
    b: V.Vec
    curv_idx: list[int]
    resid_idx: list[int]
    preconditioner: Preconditioner | None = None
    damping_info: dict[str, Any] | None = None
    samples: int = 0
    extra_info: dict[str, Any] = field(default_factory=dict)


class DampedProblem:
    """(H + λI) over a sample set, with product counting; implements :class:`.solvers.LinearProblem`.

    ``extra`` is a deterministic term added to every product (the edits' own curvature in refinement).
    """

    def __init__(self, state: SolveState, rhs: V.Vec, extra: Callable[[V.Vec], V.Vec] | None = None) -> None:
        self.engine, self.curvature, self.config = state.engine, state.curvature, state.config
        self.extra = extra
        self.preconditioner = state.preconditioner  # M ≈ (H+λI)⁻¹ for PCG; products stay exact
        self.b, self.damping = rhs, state.config.damping
        self.n_params = sum(t.numel() for t in rhs)
        self.curv_idx, self.resid_idx = state.curv_idx, state.resid_idx
        self.product_samples = 0
        self._gen = torch.Generator().manual_seed(state.config.seed)  # CPU draws: the same order on any device
        self._queue: list[int] = []

    def _damped(self, v: V.Vec, idx: list[int]) -> V.Vec:
        hv = self.engine.product(v, self.curvature, idx, self.config.batch_size)
        self.product_samples += len(idx)
        if self.extra is not None:
            hv = V.add(hv, self.extra(v))
        return V.axpy(self.damping, v, hv) if self.damping else hv

    def matvec(self, v: V.Vec) -> V.Vec:
        return self._damped(v, self.curv_idx)

    def minibatch_matvec(self, v: V.Vec) -> V.Vec:
        """An unbiased estimate: the next batch of a reshuffled pass over the curvature set."""
        if len(self._queue) < self.config.batch_size:
            perm = torch.randperm(len(self.curv_idx), generator=self._gen).tolist()
            self._queue += [self.curv_idx[i] for i in perm]
        idx, self._queue = self._queue[: self.config.batch_size], self._queue[self.config.batch_size :]
        return self._damped(v, idx)

    def residual(self, x: V.Vec) -> float:
        r = V.sub(self._damped(x, self.resid_idx), self.b)
        return V.norm(r) / V.norm(self.b)

    def residual_matvec(self, v: V.Vec) -> V.Vec:
        """(H + λI) v over the residual set (the samples ``residual`` measures on)."""
        return self._damped(v, self.resid_idx)


def linear_solve(state: SolveState, rhs: V.Vec, extra: Callable[[V.Vec], V.Vec] | None = None) -> SolverOutput:
    """Solve (H [+ extra] + λI) x = rhs with the configured solver, counting its product samples in the state."""
    problem = DampedProblem(state, rhs, extra)
    try:
        with state.engine.inference_mode():
            return SOLVERS[state.config.method](problem, state.config)
    finally:
        state.samples += problem.product_samples


def damped_solve(state: SolveState, rhs: V.Vec, extra: Callable[[V.Vec], V.Vec] | None = None) -> SolverOutput:
    """:func:`linear_solve`; with automatic damping, non-positive curvature met by CG raises λ (up to MAX_INCREASES
    times, each recorded in ``state.damping_info['increases']``) and solves again. ``state.config`` ends with the
    λ that was used."""
    while True:
        try:
            return linear_solve(state, rhs, extra)
        except NotPositiveDefiniteError as e:
            info = state.damping_info
            if info is None or e.rayleigh is None or len(info["increases"]) >= MAX_INCREASES:
                raise
            lam = raised_damping(state.config.damping, e.rayleigh)
            info["increases"].append({"from": state.config.damping, "to": lam, "rayleigh": e.rayleigh})
            info["value"] = lam
            state.config = dataclasses.replace(state.config, damping=lam)


__all__ = ["DampedProblem", "Indexed", "SolveState", "damped_solve", "linear_solve"]
