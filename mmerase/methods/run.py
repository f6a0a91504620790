"""``unlearn``: any registered method on a request, with its accounting; ``estimate``: what it would cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..influence import InfluenceEngine
from .accounting import Accounting, Budget, Checkpoints, Meter
from .base import Job, Method, MethodError, check_serves
from .registry import get_method


@dataclass
class MethodResult:
    """What :func:`unlearn` returns: the method, δ = θ_new − θ̂ and the new trainable parameters θ_new (both keyed
    like ``model.named_parameters()``; θ_new exactly as trained, not θ̂ + δ rounded), the :class:`Accounting`, the
    method's ``info`` (steps, losses, …; a solve's summary for influence), its config, the budget, and for influence
    the :class:`~mmerase.influence.SolveResult` (``solve``)."""

    method: str
    delta: dict[str, torch.Tensor]
    parameters: dict[str, torch.Tensor]
    accounting: Accounting
    info: dict[str, Any] = field(default_factory=dict)
    config: Any = None
    budget: str | None = None
    solve: Any = None

    def summary(self) -> dict[str, Any]:
        """Everything but the tensors, for run records."""
        from dataclasses import asdict, is_dataclass

        return {"method": self.method, "config": asdict(self.config) if is_dataclass(self.config) else self.config,
                "budget": self.budget, "info": self.info, "accounting": self.accounting.to_dict()}


def as_engine(target: Any, train: Sequence[Any] | None) -> InfluenceEngine:
    """An :class:`InfluenceEngine` (returned as is) or a model bundle + its training set → an engine."""
    if isinstance(target, InfluenceEngine):
        return target
    if train is None:
        raise MethodError("unlearn() needs the training set when given a model bundle (train=...)")
    return InfluenceEngine(target.model, target.loss_fn, train, collate_fn=target.collate)


def check_request(method: str | Method, edits: Sequence[Any], config: Any, budget: Any, retrain_passes: int | None,
                  labels: Sequence[tuple[str, str]] | None = None, how: str = "method "
                  ) -> tuple[Method, Any, float | None, str | None]:
    """Everything about a request that can be refused before any work: the method, the op each edit needs, the
    config's type, the budget. Returns (method, config, budget in sample passes, the budget as given)."""
    spec = get_method(method) if isinstance(method, str) else method
    if not edits:
        raise MethodError("no edits given: pass at least one Edit(old, new)")
    check_serves(spec, edits, labels, how)
    config = spec.default_config() if config is None else config
    if not isinstance(config, spec.config_class):
        raise MethodError(f"method '{spec.name}' takes a {spec.config_class.__name__}, got {type(config).__name__}")
    parsed = None if budget is None else Budget.parse(budget)
    passes = None if parsed is None else parsed.passes(retrain_passes)
    if spec.spends_budget and passes is None:
        raise MethodError(f"method '{spec.name}' needs a compute budget: --budget 600 (sample passes) or --budget 10% "
                          "(of one retraining)")
    return spec, config, passes, None if parsed is None else str(parsed)


def make_job(target: Any, train: Sequence[Any] | None, edits: Sequence[Any], method: str | Method, config: Any,
             budget: Any, retrain_passes: int | None, labels: Sequence[tuple[str, str]] | None
             ) -> tuple[Method, Job, str | None]:
    """:func:`check_request`, then the job on ``target``'s engine."""
    edits = list(edits)
    spec, config, passes, budget_text = check_request(method, edits, config, budget, retrain_passes, labels)
    job = Job(engine=as_engine(target, train), edits=edits, config=config, budget=passes,
              retrain_passes=retrain_passes)
    return spec, job, budget_text


def unlearn(target: Any, train: Sequence[Any] | None, edits: Sequence[Any], method: str = "influence",
            config: Any = None, budget: Any = None, *, retrain_passes: int | None = None,
            labels: Sequence[tuple[str, str]] | None = None, checkpoints: Checkpoints | None = None,
            preconditioner: Any = None, plan: Any = None, costs: dict[str, Any] | None = None,
            apply: bool = True) -> MethodResult:
    """Serve ``edits`` (a list of :class:`~mmerase.influence.Edit`) on ``target`` (a model bundle with its training
    set ``train``, or an :class:`~mmerase.influence.InfluenceEngine`) with ``method`` and its ``config`` (the
    method's config dataclass; default: its defaults), spending at most ``budget`` (sample passes, ``"10%"`` of one
    retraining — which needs ``retrain_passes`` — or a :class:`Budget`; the gradient methods need one).

    An edit the method cannot serve, or a budget ≤ 0, is refused with a :class:`MethodError` before any work.
    ``checkpoints`` (:class:`Checkpoints`) calls back during the run (a gradient method's: every k steps and at
    nested budgets; influence's: after every Newton step), e.g. to score several budgets from one run;
    ``preconditioner`` and ``plan`` go to the influence solve; ``costs`` (from :func:`~.accounting.measure_costs`)
    adds a curvature product's measured cost in gradients to the accounting.
    On return the model holds θ_new (θ̂ when ``apply=False``, or when the run fails).
    """
    spec, job, budget_text = make_job(target, train, edits, method, config, budget, retrain_passes, labels)
    job.checkpoints, job.preconditioner, job.plan = checkpoints, preconditioner, plan
    engine = job.engine
    theta_hat = [p.detach().clone() for p in engine.params]
    try:
        with Meter(engine) as meter:
            job.meter = meter
            out = spec.run(job)
    except BaseException:  # a failed run leaves the adapter as it found it
        engine.set_parameters(theta_hat)
        raise
    accounting = meter.accounting(product_samples=out.product_samples, retrain_passes=retrain_passes,
                                  budget_passes=job.budget,
                                  product_cost_gradients=(costs or {}).get("product_cost_gradients"),
                                  measurement=None if costs is None else
                                  {k: v for k, v in costs.items() if k != "memory_report"})
    if out.delta is not None:
        engine.apply(out.delta)
    parameters = engine.named(engine.params)
    delta = {n: parameters[n] - t for n, t in zip(engine.names, theta_hat)} if out.delta is None else out.delta
    if not apply:
        engine.set_parameters(theta_hat)
    return MethodResult(spec.name, delta, parameters, accounting, out.info, job.config, budget_text, out.solve)


def estimate(target: Any, train: Sequence[Any] | None, edits: Sequence[Any], method: str = "influence",
             config: Any = None, budget: Any = None, *, retrain_passes: int | None = None,
             labels: Sequence[tuple[str, str]] | None = None, costs: dict[str, Any], plan: Any = None,
             preconditioner: Any = None) -> dict[str, Any]:
    """What :func:`unlearn` with these arguments would cost, without running it: sample passes (exact for the
    gradient methods, whose steps are planned; a bound for influence), the fraction of one retraining, and seconds
    at the rate ``costs`` measured (:func:`~.accounting.measure_costs`)."""
    spec, job, budget_text = make_job(target, train, edits, method, config, budget, retrain_passes, labels)
    job.plan, job.preconditioner = plan, preconditioner
    out = spec.estimate(job, costs)
    out.update(method=spec.name, budget=budget_text, budget_passes=job.budget, retrain_passes=retrain_passes,
               retraining_fraction=out["sample_passes"] / retrain_passes if retrain_passes else None, costs=costs)
    return out


__all__ = ["MethodResult", "as_engine", "check_request", "estimate", "make_job", "unlearn"]
