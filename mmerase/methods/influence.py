"""The influence update (the default method): δ = (H + λI)⁻¹ b, optionally refined, by
:meth:`mmerase.influence.InfluenceEngine.solve` with a :class:`~mmerase.influence.SolverConfig`.

Its settings decide its cost (it spends no budget; a budget given is recorded with whether the cost stayed within
it). Every pass of the solve is counted by the accounting: b, the damping estimate, the solve's products, the
stationarity check, refinement steps and their line searches. Checkpoints (:class:`~.accounting.Checkpoints`) see
every Newton step of one solve: the plain update, then each refinement step, with what it had cost so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..influence import SolverConfig
from ..influence.distributed import is_zero3
from ..influence.plan import ESTIMATE, resolve
from .accounting import CheckpointInfo, estimate_from_parts
from .base import Job, Method, MethodOutput
from .registry import register_method


@register_method
class Influence(Method):
    name = "influence"
    config_class = SolverConfig
    spends_budget = False

    def plan(self, job: Job) -> Any:
        if job.plan is not None:
            return job.plan
        return resolve(job.config, preparation_damping=getattr(job.preconditioner, "damping", None),
                       zero3=is_zero3(job.engine.model))

    def run(self, job: Job) -> MethodOutput:
        result = job.engine.solve(job.edits, self.plan(job), preconditioner=job.preconditioner,
                                  callback=self.checkpointer(job))
        return MethodOutput(info=result.summary(), delta=result.delta, solve=result,
                            product_samples=result.product_samples)

    @staticmethod
    def checkpointer(job: Job) -> Callable[[int, Any, dict[str, Any]], None] | None:
        """The solve's callback for ``job.checkpoints``: called after every Newton step (1: the plain influence
        update; then each refinement step) with the model at θ̂ + δ of that step and the sample passes counted so far
        (this process's; the stationarity gradient of that step included)."""
        spec, counter = job.checkpoints, getattr(job.meter, "counter", None)
        if spec is None:
            return None

        def callback(step: int, _delta: Any, _record: dict[str, Any]) -> None:
            passes = (counter.forward + 2 * counter.backward) / 3 if counter is not None else float("nan")
            spec.callback(CheckpointInfo(step, passes))
        return callback

    def estimate(self, job: Job, costs: dict[str, Any]) -> dict[str, Any]:
        """Bounds: b and the stationarity check are exact; the damping estimate, the solve (≤ max_steps products)
        and refinement (≤ refine_steps × (a gradient pass, a solve with the edits' curvature, a 5-step line
        search)) at most. Product samples cost their counted passes (``costs['product_sample_passes']``)."""
        plan, engine = self.plan(job), job.engine
        cfg = plan.config
        curv = len(engine.solve_sets(cfg)[0])
        edits = sum((e.old is not None) + (e.new is not None) for e in job.edits)
        solve = _solve_products(cfg, curv, sum(p.numel() for p in engine.params))
        check = 1 if (cfg.stationarity_check or cfg.refine_steps) else 0
        # (gradient sample passes, product samples) of each part
        parts = {"b": (edits, 0.0),
                 "damping": (0.0, cfg.damping_steps * curv if plan.damping_source == ESTIMATE else 0.0),
                 "solve": (0.0, solve), "stationarity": (check * (2 * curv + edits), 0.0),
                 "refinement": (cfg.refine_steps * (curv + edits + 5 * (curv + edits) / 3),
                                cfg.refine_steps * (solve + edits * (cfg.max_steps + 2)))}
        return estimate_from_parts(parts, costs, "an upper bound: the solve stops at its tolerance, usually well before "
                                   "max_steps")


def _solve_products(cfg: SolverConfig, curv: int, n_params: int) -> float:
    """At most how many samples one solve pushes through products (in product samples)."""
    if cfg.method == "dense":
        return float(n_params * curv)
    if cfg.method in ("stochastic", "lissa"):
        evals = math.ceil(cfg.max_steps / max(1, cfg.eval_every)) * curv
        return float(cfg.max_steps * min(cfg.batch_size, curv) + evals + curv)
    if cfg.method == "prepared":
        return float(curv)
    return float((cfg.max_steps + 2) * curv)  # cg: a product per step, the first residual, the final check


__all__ = ["Influence"]
