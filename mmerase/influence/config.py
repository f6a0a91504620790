"""Solver configuration: one small dataclass shared by every solver and curvature, and the single source of the
solver's command-line options (each field carries its help text and choices; see :mod:`mmerase.options`)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..options import option
from .registry import curvature_names, solver_names

REFINE_DAMPINGS = ("proximal", "step")
GGN_JVPS = ("autograd", "fd")


def parse_damping(text: str) -> float | str:
    """'auto' or a number ≥ 0 (the command-line and config-file form of ``damping``)."""
    if str(text).lower() == "auto":
        return "auto"
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


parse_damping.__name__ = "damping (a number ≥ 0 or 'auto')"  # argparse names the type in its errors


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown {kind} '{value}'{hint}; choose one of: {', '.join(choices)}")


@dataclass
class SolverConfig:
    """How to solve (H + λI) δ = b, and how to refine it. Each field's help text says what it does; the resolved
    plan (:func:`mmerase.influence.plan.resolve`) turns a config into the curvature object, λ and the product
    requirements the engine uses."""

    method: str = option("cg", flag="--solver", choices=solver_names, help=(
        "cg: conjugate gradient over the whole curvature set (fewest products); stochastic: Adam on "
        "½δᵀ(H+λI)δ − bᵀδ with mini-batch products (LLMEraser); lissa: Neumann series; dense: forms H (tiny "
        "adapters only); prepared: one step with a preparation's preconditioner (approximate, no solve). cg and "
        "stochastic given a preparation run preconditioned, still exact"))
    curvature: str = option("hessian", choices=curvature_names, help=(
        "hessian: exact (double backward); fd-hessian: central differences of gradients (first-order passes); "
        "ggn: Gauss-Newton (PSD); fisher: empirical Fisher (PSD); sampled-fisher: true Fisher from seeded label "
        "draws (PSD)"))
    damping: float | str = option("auto", parse=parse_damping, help=(
        "λ added to the curvature (H + λI): a number, or auto: --damping-scale × the curvature's top eigenvalue "
        "(--damping-steps Lanczos products), raised when the curvature shows negative eigenvalues or CG meets "
        "them; with a preparation, auto means its λ. The λ used is in the run record"))
    damping_scale: float = option(1e-2, help="the fraction of the top eigenvalue that --damping auto takes")
    damping_steps: int = option(20, help="Lanczos steps (curvature products) --damping auto spends on the spectrum")
    tol: float = option(1e-4, help="stop when the relative residual ‖(H+λI)δ − b‖/‖b‖ is below this")
    max_steps: int = option(200, help="solver iterations (CG steps, Adam steps, LiSSA recursion steps)")
    batch_size: int = option(16, help="samples per curvature product chunk / mini-batch")
    seed: int = option(0, help="seed of mini-batch sampling, sub-samples, label draws and Lanczos start vectors")
    lr: float | None = option(None, help="Adam step of the stochastic solver (default: 0.1 × the RMS of the "
                              "steepest-descent step, one extra product)")
    lissa_scale: float | None = option(None, help="LiSSA divides by this (default: 1.1 × a power-iteration "
                                       "estimate of the top eigenvalue)")
    residual_samples: int | None = option(None, help=(
        "measure the stochastic solvers' residual on a fixed random subset of this many training samples "
        "(default: the curvature set)"))
    curvature_samples: int | None = option(None, help=(
        "products over a fixed random subset of this many training samples (default: all). δ then solves the "
        "sub-sampled system: its distance to the full-curvature δ is set by the subset (benchmarks/README.md, "
        "request reuse), so sub-sample only with enough damping, and check"))
    eval_every: int = option(10, help="stochastic solvers measure the residual every this many steps")
    fd_eps: float | None = option(None, help=(
        "relative finite-difference step of fd-hessian and --ggn-jvp fd (default: cbrt of the machine epsilon "
        "of the precision the model computes in)"))
    ggn_jvp: str | None = option(None, choices=GGN_JVPS, help=(
        "how ggn computes J·v: autograd (exact, double backward) or fd (first-order passes); default: autograd, "
        "fd under --deepspeed"))
    dense_max_params: int = option(4096, help="the dense solver refuses adapters with more parameters than this")
    divergence_factor: float = option(1e3, help="a stochastic solver whose residual exceeds this stops with an error")
    refine_steps: int = option(0, help=(
        "Newton refinement steps after the influence update, each one gradient pass over the curvature set plus "
        "a solve with the edited objective's curvature (0: the plain update)"))
    refine_damping: str = option("proximal", choices=REFINE_DAMPINGS, help=(
        "λ in refinement: proximal keeps (λ/2)‖θ − θ̂‖² in the edited objective (stays near the trained adapter; a "
        "step that raises the stationarity gap is undone); step damps each Newton step only (Levenberg–Marquardt: "
        "converges to the undamped edited optimum; every step must lower the objective)"))
    refine_edit_samples: int | None = option(None, help=(
        "edits whose own curvature enters each refinement step's solve, a fixed seeded subset scaled to all of them "
        "(default: all; 0: none, an inexact Newton step on the training curvature alone that the line search still "
        "guards). Each edit costs two samples in every product of every refinement solve"))
    stationarity_check: bool = option(True, help=(
        "certify δ by the stationarity gap ‖∇R̃_E(θ̂+δ)‖/‖∇R̃_E(θ̂)‖ (two gradient passes over the curvature set)"))
    progress: bool | None = option(None, help="progress bars (default: only on a terminal)")

    def __post_init__(self) -> None:
        _check_choice("solver", self.method, solver_names())
        _check_choice("curvature", self.curvature, curvature_names())
        if self.ggn_jvp is not None:
            _check_choice("ggn_jvp", self.ggn_jvp, GGN_JVPS)
        _check_choice("refine_damping", self.refine_damping, REFINE_DAMPINGS)
        if isinstance(self.damping, str) and self.damping != "auto":
            try:
                self.damping = float(self.damping)
            except ValueError:
                raise ValueError(f"damping must be a number ≥ 0 or 'auto', got '{self.damping}'") from None
        if self.damping != "auto" and not (self.damping >= 0):
            raise ValueError(f"damping must be ≥ 0 or 'auto', got {self.damping}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        if not (self.damping_scale > 0):
            raise ValueError(f"damping_scale must be > 0, got {self.damping_scale}")
        if not (self.tol > 0):
            raise ValueError(f"tol must be > 0, got {self.tol}")
        for name in ("max_steps", "batch_size", "eval_every", "dense_max_params", "damping_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if int(self.refine_steps) < 0:
            raise ValueError(f"refine_steps must be ≥ 0, got {self.refine_steps}")
        for name in ("residual_samples", "curvature_samples"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be ≥ 1 or None, got {v}")
        if self.refine_edit_samples is not None and int(self.refine_edit_samples) < 0:
            raise ValueError(f"refine_edit_samples must be ≥ 0 or None, got {self.refine_edit_samples}")
        for name in ("lr", "lissa_scale", "fd_eps"):
            v = getattr(self, name)
            if v is not None and not (v > 0):
                raise ValueError(f"{name} must be > 0, got {v}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SolverConfig":
        """Build from a mapping; an unknown key is an error that names it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown solver option '{unknown[0]}'{hint}")
        return cls(**values)

    @property
    def auto_damping(self) -> bool:
        """True when λ is to be estimated from the curvature ('auto')."""
        return self.damping == "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
