"""The resolved plan of a solve: a :class:`SolverConfig` (plus a preparation's λ and whether the base is ZeRO-3
sharded) turned once into what everything downstream uses — the curvature object, how λ is decided, whether
products need a double backward — so that the engine, ``prepare``, the memory report, the CLI, the demo and the
run record read the same decisions instead of re-deriving them.

λ itself is decided in one function, :func:`initial_damping`: the user's number, the preparation's λ (for
``damping='auto'`` with a preparation, which was built for a λ), or an estimate from the curvature's spectrum
(:mod:`.damping`). A solve may raise it afterwards when CG meets negative curvature (recorded step by step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import vectors as V
from .config import SolverConfig
from .curvature import Curvature, make_curvature
from .damping import estimate_damping
from .errors import InfluenceError

#: how the initial λ is decided
GIVEN, PREPARATION, ESTIMATE = "given", "preparation", "estimate"


@dataclass(frozen=True)
class SolvePlan:
    """What a solve will do. ``config`` is the request with ``ggn_jvp`` resolved (its ``damping`` still as
    requested); ``damping`` is λ when it is known before any product (given, or the preparation's), else None."""

    config: SolverConfig
    curvature: Curvature
    damping_source: str
    damping: float | None
    zero3: bool = False

    @property
    def needs_double_backward(self) -> bool:
        """Products differentiate through a backward pass (exact Hessian, GGN with autograd J·v): the model needs
        eager attention and cannot be ZeRO-3 sharded."""
        return bool(self.curvature.needs_second_order)

    def describe(self) -> dict[str, Any]:
        """The plan for run records (what was requested is in ``config``)."""
        return {"curvature": self.curvature.name, "ggn_jvp": self.config.ggn_jvp,
                "damping_source": self.damping_source, "damping": self.damping,
                "needs_double_backward": self.needs_double_backward, "zero3": self.zero3}


def resolve(config: SolverConfig, *, preparation_damping: float | None = None, zero3: bool = False) -> SolvePlan:
    """Turn a request into a plan. ``preparation_damping`` is the λ of the preconditioner the solve will use (if
    any): ``damping='auto'`` then means that λ. Under ZeRO-3 the GGN's J·v defaults to finite differences."""
    ggn_jvp = config.ggn_jvp or ("fd" if zero3 else "autograd")
    config = dataclasses.replace(config, ggn_jvp=ggn_jvp)
    curvature = make_curvature(config.curvature, fd_eps=config.fd_eps, ggn_jvp=ggn_jvp, seed=config.seed)
    if not config.auto_damping:
        return SolvePlan(config, curvature, GIVEN, float(config.damping), zero3)
    if preparation_damping:
        return SolvePlan(config, curvature, PREPARATION, float(preparation_damping), zero3)
    return SolvePlan(config, curvature, ESTIMATE, None, zero3)


def initial_damping(plan: SolvePlan, matvec: Callable[[V.Vec], V.Vec], like: V.Vec, samples_per_product: int
                    ) -> tuple[float, dict[str, Any] | None]:
    """The λ a solve starts from, and how it was found (None for a user's number). ``matvec`` multiplies by the
    curvature over the curvature set (``samples_per_product`` samples each), for the estimate."""
    if plan.damping_source == GIVEN:
        return float(plan.damping), None  # type: ignore[arg-type]
    if plan.damping_source == PREPARATION:
        return float(plan.damping), {"rule": "the preconditioner's λ", "value": plan.damping, "increases": [],  # type: ignore[arg-type]
                                     "product_samples": 0}
    calls = [0]

    def counted(v: V.Vec) -> V.Vec:
        calls[0] += 1
        return matvec(v)

    config = plan.config
    try:
        lam, info = estimate_damping(counted, like, config.damping_scale, config.damping_steps, seed=config.seed,
                                     progress=config.progress)
    except ValueError as e:
        raise InfluenceError(f"automatic damping: {e}") from e
    info["product_samples"] = calls[0] * samples_per_product
    return lam, info


__all__ = ["ESTIMATE", "GIVEN", "PREPARATION", "SolvePlan", "initial_damping", "resolve"]
