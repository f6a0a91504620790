"""Solver configuration: one small dataclass shared by every solver and curvature."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any

SOLVERS = ("cg", "stochastic", "lissa", "dense", "prepared")
CURVATURES = ("hessian", "fd-hessian", "ggn", "fisher", "sampled-fisher")


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown {kind} '{value}'{hint}; choose one of: {', '.join(choices)}")


@dataclass
class SolverConfig:
    """How to solve (H + λI) δ = b.

    method:      'cg' (conjugate gradient on products over the whole curvature set; the default),
                 'stochastic' (Adam on ½δᵀ(H+λI)δ − bᵀδ with mini-batch products; the LLMEraser method),
                 'lissa' (Neumann-series recursion with mini-batch products), 'dense' (forms H; small models only),
                 'prepared' (δ = M b from a preparation's preconditioner M alone: approximate, no solve; see
                 mmerase.prepare). 'cg' and 'stochastic' given a preconditioner run preconditioned, still exact.
    curvature:   'hessian' (exact double backward), 'fd-hessian' (central differences of gradients),
                 'ggn' (Gauss-Newton, PSD; needs a Task loss), 'fisher' (empirical Fisher, PSD),
                 'sampled-fisher' (the true Fisher by one seeded label draw per sample, scaled to be unbiased
                 for the GGN; PSD; needs a Task with sample_targets).
    damping:     λ ≥ 0 added to the curvature, or 'auto' (the default): λ = damping_scale × the curvature's top
                 eigenvalue, raised when the curvature shows negative eigenvalues (see mmerase.influence.damping);
                 the value used and how it was found are in ``result.info['damping']``.
    damping_scale: the fraction of the top eigenvalue that 'auto' takes.
    damping_steps: Lanczos steps (curvature products) that 'auto' spends on the spectrum.
    tol:         stop when the relative residual ‖(H+λI)δ − b‖/‖b‖ falls below this.
    max_steps:   solver iterations (CG steps, Adam steps, LiSSA recursion steps).
    batch_size:  samples per product / gradient chunk (mini-batch size for 'stochastic' and 'lissa').
    seed:        makes mini-batch sampling deterministic.
    lr:          Adam step for 'stochastic' (None: 0.1 × the RMS of the steepest-descent step, one extra product).
    lissa_scale: LiSSA divides by this (None: 1.1 × a power-iteration estimate of the top eigenvalue).
    residual_samples:  size of the fixed random training subset on which stochastic solvers measure the
                 residual (None: the whole curvature set).
    curvature_samples: products over a fixed random subset of this many training samples (None: all).
                 Each product costs that many samples instead of n, but δ then solves the sub-sampled system,
                 so its distance to the full-curvature δ is set by the subset, not by the solver's tolerance.
                 Measured (benchmarks/request_reuse*.md, digits RC, n=560, GGN): at λ=0.1 a subset of 64 / 140
                 moves δ by 75% / 55% of its norm with a comparable recovery; at λ=0.01 by 168% / 119%, and the
                 64-sample δ made the corrected answers worse. Sub-sample only with enough damping, and check.
    eval_every:  stochastic solvers measure the residual every this many steps.
    fd_eps:      relative finite-difference step for 'fd-hessian' and ggn_jvp='fd' (None: cbrt(machine eps)).
    ggn_jvp:     how 'ggn' computes J·v: 'autograd' (exact, double backward) or 'fd' (first-order passes only).
    dense_max_params: 'dense' refuses models with more trainable parameters than this.
    divergence_factor: a stochastic solver whose residual exceeds this is stopped with an error.
    refine_steps: Newton refinement steps after the influence update (0: the plain update), each one
                 gradient pass over the curvature set plus a solve with the edited objective's curvature; a step
                 that raises the stationarity gap is undone and ends the refinement.
    refine_damping: what λ is in refinement. 'proximal' (default): a term (λ/2)‖θ − θ̂‖² of the edited
                 objective, so refinement converges to the damped update's exact version and stays near θ̂.
                 'step': only each Newton step is damped (Levenberg–Marquardt), so refinement converges to a
                 stationary point of the undamped corrected objective, the retrained adapter's if the loss is
                 locally convex there; it may walk far along flat directions where it is not. Every step must
                 lower the objective (line search), but a step that raises the gap is kept (on a non-convex
                 loss the gap is not monotone along descent); the record has each step's gap.
    stationarity_check: compute the stationarity gap ‖∇R̃_E(θ̂+δ)‖/‖∇R̃_E(θ̂)‖ (two gradient passes).
    progress:    show a progress bar (None: only on a terminal).
    """

    method: str = "cg"
    curvature: str = "hessian"
    damping: float | str = "auto"
    damping_scale: float = 1e-2
    damping_steps: int = 20
    tol: float = 1e-4
    max_steps: int = 200
    batch_size: int = 16
    seed: int = 0
    lr: float | None = None
    lissa_scale: float | None = None
    residual_samples: int | None = None
    curvature_samples: int | None = None
    eval_every: int = 10
    fd_eps: float | None = None
    ggn_jvp: str = "autograd"
    dense_max_params: int = 4096
    divergence_factor: float = 1e3
    refine_steps: int = 0
    refine_damping: str = "proximal"
    stationarity_check: bool = True
    progress: bool | None = None

    def __post_init__(self) -> None:
        _check_choice("solver", self.method, SOLVERS)
        _check_choice("curvature", self.curvature, CURVATURES)
        _check_choice("ggn_jvp", self.ggn_jvp, ("autograd", "fd"))
        _check_choice("refine_damping", self.refine_damping, ("proximal", "step"))
        if isinstance(self.damping, str) and self.damping != "auto":
            try:
                self.damping = float(self.damping)
            except ValueError:
                raise ValueError(f"damping must be a number ≥ 0 or 'auto', got '{self.damping}'") from None
        if self.damping != "auto" and not (self.damping >= 0):
            raise ValueError(f"damping must be ≥ 0 or 'auto', got {self.damping}")
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
        if self.lr is not None and not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lissa_scale is not None and not (self.lissa_scale > 0):
            raise ValueError(f"lissa_scale must be > 0, got {self.lissa_scale}")

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
