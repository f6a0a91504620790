"""Newton refinement of an influence update on the stationarity-corrected edited objective, and the stationarity
gap that certifies an update (see docs/design.md, "Refinement").

R̃_E(θ) = R(θ) − ∇R(θ̂)ᵀ(θ − θ̂) + (1/n) Σ_E [L(z_new; θ) − L(z_old; θ)] [+ (λ/2)‖θ − θ̂‖² in proximal mode]

has gradient −b at θ̂, so a Newton step from θ̂ is exactly the plain influence update; later steps remove the
edit's higher-order (Taylor) error, not the adapter's distance from a training optimum (the correction term).
Steps use R̃_E's own curvature, H + (1/n) Σ_E [C(z_new) − C(z_old)], are line-searched on R̃_E, and:

- ``refine_damping='proximal'``: λ stays in R̃_E, so refinement converges to the damped update's exact version;
  a step that raises the stationarity gap (a curvature that misreads R̃_E, e.g. GGN where the Hessian is
  indefinite) is undone and ends the refinement;
- ``refine_damping='step'``: λ damps each step only (Levenberg–Marquardt), converging to a stationary point of
  the undamped R̃_E; a step that raises the gap but lowers R̃_E is kept (the gap is not monotone along descent on
  a non-convex loss).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from . import vectors as V
from .edits import Edit
from .problem import Indexed, SolveState, damped_solve
from .solvers import SolverOutput

#: the line search halves the step down to this fraction; below it the refinement stops
MIN_STEP = 1 / 16

Callback = Callable[[int, dict[str, torch.Tensor], dict[str, Any]], None]


class Refinement:
    """The Newton steps after the first solve of one :class:`SolveState`; the model is back at θ̂ afterwards."""

    def __init__(self, state: SolveState, edits: list[Edit], b_norm: float, callback: Callback | None) -> None:
        self.state, self.edits, self.b_norm, self.callback = state, edits, b_norm, callback
        self.engine = state.engine
        self.proximal = state.config.refine_damping == "proximal"  # λ a term of R̃_E, not only of each step
        self.g_hat = self.engine.mean_gradient(state.curv_idx, state.config.batch_size)  # ∇R(θ̂)
        self.saved = [p.detach().clone() for p in self.engine.params]
        self.records: list[dict[str, Any]] = []

    def gradient(self, x: V.Vec) -> V.Vec:
        """∇R̃_E(θ̂ + x) (the model is left at θ̂ + x)."""
        cfg, engine = self.state.config, self.engine
        engine.set_parameters(self.saved, x)
        grad = V.sub(V.sub(engine.mean_gradient(self.state.curv_idx, cfg.batch_size), self.g_hat),
                     engine.edit_gradient(self.edits, cfg.batch_size))
        if cfg.damping and self.proximal:  # the term (λ/2)‖θ − θ̂‖²
            grad = V.axpy(cfg.damping, x, grad)
        return grad

    def curvature_edits(self) -> tuple[list[Edit], float]:
        """The edits whose curvature enters the refinement solves, and the factor that scales them to all edits
        (``refine_edit_samples``: a fixed seeded subset; 0: none)."""
        k = self.state.config.refine_edit_samples
        if k is None or k >= len(self.edits):
            return self.edits, 1.0
        g = torch.Generator().manual_seed(self.state.config.seed + 2)
        chosen = sorted(torch.randperm(len(self.edits), generator=g)[:k].tolist())
        return [self.edits[i] for i in chosen], len(self.edits) / k if k else 0.0

    def edit_curvature(self) -> Callable[[V.Vec], V.Vec] | None:
        """v ↦ (1/n) Σ_E [C(z_new) − C(z_old)] v, the curvature the edits add to R̃_E's Hessian (estimated from
        ``refine_edit_samples`` of them), or None when no edit's curvature is used."""
        edits, factor = self.curvature_edits()
        if not edits:
            return None
        cfg = self.state.config

        def product(v: V.Vec) -> V.Vec:
            self.state.samples += 2 * len(edits)
            hv = self.engine.edit_product(edits, v, self.state.curvature, cfg.batch_size)
            return hv if factor == 1.0 else V.scale(factor, hv)
        return product

    def objective(self, x: V.Vec) -> float:
        """R̃_E(θ̂ + x) up to a constant."""
        cfg, engine = self.state.config, self.engine
        engine.set_parameters(self.saved, x)
        with torch.no_grad(), engine.inference_mode():
            idx = self.state.curv_idx
            train = engine.loss_sum(Indexed(engine.train_set, idx), cfg.batch_size) / len(idx)
            new = engine.loss_sum([e.new for e in self.edits if e.new is not None], cfg.batch_size)
            old = engine.loss_sum([e.old for e in self.edits if e.old is not None], cfg.batch_size)
        prox = 0.5 * cfg.damping * V.dot(x, x) if self.proximal else 0.0
        return train - V.dot(self.g_hat, x) + (new - old) / engine.n + prox

    def line_search(self, x: V.Vec, step: V.Vec, f_x: float | None = None) -> tuple[float, V.Vec, float]:
        """The largest t in 1, 1/2, … ≥ MIN_STEP with R̃_E(x + t·step) < R̃_E(x) (``f_x``, when already known);
        returns (t, x + t·step, R̃_E there); t = 0 and x itself when there is none."""
        f_x = self.objective(x) if f_x is None else f_x
        t = 1.0
        while t >= MIN_STEP:
            trial = V.axpy(t, step, x)
            f_trial = self.objective(trial)
            if f_trial < f_x:
                return t, trial, f_trial
            t /= 2
        return 0.0, x, f_x

    def run(self, x: V.Vec, out: SolverOutput, history: list[dict], steps: int) -> tuple[V.Vec, SolverOutput, int]:
        """Up to ``refine_steps`` Newton steps from θ̂ + x; returns the final (x, its solver output, total steps)
        and leaves each step's record in :attr:`records`."""
        state, before = self.state, None  # (x, out, config) before the last accepted step
        f_x: float | None = None  # R̃_E at x, once a line search has evaluated it
        try:
            for k in range(state.config.refine_steps + 1):
                t_k = time.perf_counter()
                grad = self.gradient(x)
                gap = V.norm(grad) / self.b_norm
                if self.proximal and before is not None and gap > self.records[-1]["stationarity_gap"]:
                    self.records.append({"newton_step": k + 1, "stationarity_gap": gap, "rejected": True})
                    x, out, state.config = before  # with the λ x was solved with (a step may have raised it)
                    if state.damping_info is not None:
                        state.damping_info["value"] = state.config.damping
                    break
                self.records.append({"newton_step": k + 1, "stationarity_gap": gap})
                if self.callback is not None:
                    self.callback(k + 1, self.engine.named(x), self.records[-1])
                if k == state.config.refine_steps:
                    break
                config_before = state.config
                step_out = damped_solve(state, V.scale(-1.0, grad), self.edit_curvature())
                steps += step_out.steps
                history += [dict(h, newton_step=k + 2) for h in step_out.history]
                if state.config.refine_damping == "proximal" or state.config.damping != config_before.damping:
                    f_x = None  # the objective itself changed with λ (a proximal term) or is yet unknown
                t, trial, f_trial = self.line_search(x, step_out.x, f_x)
                self.records[-1].update(residual=step_out.residual, step_size=t, seconds=time.perf_counter() - t_k)
                if t == 0.0:  # no decrease along the Newton direction: stop refining
                    break
                before = (x, out, config_before)
                x, out, f_x = trial, step_out, f_trial
        finally:
            self.engine.set_parameters(self.saved, None)
        return x, out, steps

    def summary(self) -> dict[str, Any]:
        accepted = [r for r in self.records if not r.get("rejected")]
        return {"stationarity_gap": accepted[-1]["stationarity_gap"], "refinement": self.records}


def finish(state: SolveState, edits: list[Edit], x: V.Vec, out: SolverOutput, history: list[dict], steps: int,
           b_norm: float, callback: Callback | None) -> tuple[V.Vec, SolverOutput, int, dict[str, Any]]:
    """After the first solve: refine and certify (when asked), or just show the update to ``callback``."""
    cfg = state.config
    if cfg.refine_steps > 0 or cfg.stationarity_check:
        ref = Refinement(state, edits, b_norm, callback)
        x, out, steps = ref.run(x, out, history, steps)
        return x, out, steps, ref.summary()
    if callback is not None:
        engine = state.engine
        saved = [p.detach().clone() for p in engine.params]
        try:
            engine.set_parameters(saved, x)
            callback(1, engine.named(x), {"newton_step": 1})
        finally:
            engine.set_parameters(saved, None)
    return x, out, steps, {}


__all__ = ["MIN_STEP", "Refinement", "finish"]
