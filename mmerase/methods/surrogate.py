"""The influence update solved and refined on a sub-sampled quadratic surrogate of the edited objective (method
``surrogate``): no step passes over the training set beyond a fixed sub-sample S, so its cost is the same whatever
the training set's size (:class:`mmerase.influence.SubspaceSurrogate`; docs/design.md, "Refinement").

    S(x) = ½ xᵀ(H_S + λI)x − g_oldᵀx + (1/n) Σ_E L(z_new; θ̂ + x)

It builds an EK-FAC preparation from a few training pairs in the request (preconditioner, and λ when ``damping`` is
auto), solves the plain update in ``krylov`` preconditioned directions, then takes ``steps`` re-linearised Galerkin
steps. Cost: ≈ 470 + 23.3·|S| sample passes, then ≈ 170 + 2.3·|S| per step, whatever n is
(``benchmarks/subspace_surrogate_s.md``). Where it pays: large training sets (at n = 8000 it recovers at least as
much held-out accuracy as a fine-tune at every budget from 10% of a retraining); on small ones (n = 500) its fixed
cost exceeds a retraining and the fine-tune wins.

With ``anchored`` the steps line-search the sampled retained pairs' own loss change since θ̂ instead of the quadratic
model (:class:`mmerase.influence.AnchoredSurrogate`): a removal can then move past the first Newton step, at about
|S| more passes per step. There the steps do the work, and ½λ‖x‖² pulls them back towards θ̂, which the retrained
adapter does not feel: on the digits removal at n = 8000 the benchmark's choice is 3 Krylov directions, 10–20 steps
and λ = 0.01 rather than auto (``benchmarks/surrogate_seeds_ir_fresh.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..influence import AnchoredSurrogate, PreconditionerConfig, SolverConfig, SubspaceSurrogate
from ..influence.config import parse_damping
from ..influence.distributed import is_zero3
from ..options import option
from ..prepare import prepare
from .accounting import estimate_from_parts
from .base import Job, Method, MethodError, MethodOutput
from .influence import Influence
from .registry import register_method


@dataclass
class SurrogateConfig:
    """The sub-sampled surrogate: S's size, λ, the Krylov solve, the steps, the preparation built in the request.

    The defaults (|S| = 512, λ auto) are the validation choice within 30% of a retraining on the digits scenario at
    n = 8000, on each of three seeds; within 10% it was |S| = 128, λ = 0.2 (``benchmarks/surrogate_seeds.md``)."""

    samples: int = option(512, flag="--surrogate-samples", help=(
        "training pairs in the fixed random sub-sample S whose exact Gauss-Newton curvature stands for the whole "
        "training set's (0: all of them); each Krylov direction and step costs one product over S"))
    damping: float | str = option("auto", flag="--surrogate-damping", parse=parse_damping, help=(
        "λ: a number, or auto: --surrogate-damping-scale × the curvature's top eigenvalue (5 Lanczos products over "
        "64 pairs)"))
    damping_scale: float = option(3e-3, flag="--surrogate-damping-scale", help="the fraction auto takes")
    krylov: int = option(10, flag="--surrogate-krylov", help="preconditioned Krylov directions of the plain update")
    steps: int = option(5, flag="--surrogate-steps", help=(
        "re-linearised Galerkin steps after the plain update, each line-searched on S"))
    prep_samples: int = option(128, flag="--surrogate-prep-samples", help=(
        "training pairs of the EK-FAC preparation built in the request (the directions' preconditioner)"))
    batch_size: int = option(128, flag="--surrogate-batch-size", help="samples per product / gradient chunk")
    anchored: bool = option(False, flag="--surrogate-anchored", help=(
        "refine on S's retained pairs themselves, anchored at the adapter (their loss change since θ̂ replaces the "
        "quadratic model in the steps' line search): about |S| more passes per step, a removal moves beyond the "
        "first Newton step; the steps do the work, so give it few --surrogate-krylov directions (3), more "
        "--surrogate-steps and a small --surrogate-damping (λ pulls the steps back towards the adapter)"))
    seed: int = option(0, flag="--surrogate-seed", help="seed of S, the preparation's samples and Lanczos start")
    progress: bool | None = option(None, help="progress bars of the preparation (default: only on a terminal)")

    def __post_init__(self) -> None:
        if self.damping != "auto" and not (float(self.damping) >= 0):
            raise MethodError(f"--surrogate-damping must be ≥ 0 or auto, got {self.damping}")
        for name in ("krylov", "prep_samples", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise MethodError(f"--surrogate-{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        for name in ("samples", "steps"):
            if int(getattr(self, name)) < 0:
                raise MethodError(f"--surrogate-{name} must be ≥ 0, got {getattr(self, name)}")


@register_method
class Surrogate(Method):
    name = "surrogate"
    config_class = SurrogateConfig
    spends_budget = False

    def run(self, job: Job) -> MethodOutput:
        cfg, engine = job.config, job.engine
        if is_zero3(engine.model):  # its products would need the forward-difference GGN the influence plan picks
            raise MethodError("method 'surrogate' does not run under DeepSpeed ZeRO-3 yet; use --method influence")
        pre = preparation(job)
        subset = engine.subset(cfg.samples if 0 < cfg.samples < engine.n else None, cfg.seed + 5)
        kind = AnchoredSurrogate if cfg.anchored else SubspaceSurrogate
        sur = kind(engine, job.edits, subset, pre.damping, pre.apply, "ggn", cfg.batch_size)
        checkpoint = Influence.checkpointer(job)
        x = sur.krylov(cfg.krylov)
        for step in range(1, cfg.steps + 2):
            if step > 1:
                x = sur.step(x)
            if checkpoint is not None:
                engine.set_parameters(sur.saved, x)
                checkpoint(step, None, {})
        value = sur.value(x)  # leaves the model at θ̂ + x: the method's answer
        info = {"surrogate_samples": len(subset), "anchored": cfg.anchored, "damping": pre.damping,
                "directions": len(sur.basis), "steps": cfg.steps, "surrogate_value": value,
                "summary": f"{len(sur.basis)} directions over {len(subset)} sampled pairs, λ {pre.damping:.3g}, "
                           f"{cfg.steps} steps, surrogate {value:.4g}"}
        return MethodOutput(info=info)

    def estimate(self, job: Job, costs: dict[str, Any]) -> dict[str, Any]:
        """Approximate: the preparation (about three passes per sample, the auto λ's 5 products over 64 pairs), b,
        one product over S per direction, and per step the new samples' gradient and a line search of at most 5
        forwards of them (anchored: S's gradient once and per step, and two forwards of S per step)."""
        cfg, engine = job.config, job.engine
        s = cfg.samples if 0 < cfg.samples < engine.n else engine.n
        olds = sum(e.old is not None for e in job.edits)
        news = sum(e.new is not None for e in job.edits)
        directions = cfg.krylov + cfg.steps
        parts = {"preparation": (3 * cfg.prep_samples, 5 * 64 if cfg.damping == "auto" else 0.0),
                 "b": (olds + news, 0.0), "products": (0.0, directions * s),
                 "steps": (cfg.steps * (news + 5 * news / 3), 0.0)}
        if cfg.anchored:
            parts["anchor"] = ((cfg.steps + 1) * s + cfg.steps * 2 * s / 3, 0.0)
        return estimate_from_parts(parts, costs, "approximate; a step whose direction adds nothing new skips its "
                                   "product")


def preparation(job: Job) -> Any:
    """The EK-FAC preconditioner (with its λ) built in the request from ``prep_samples`` pairs."""
    cfg = job.config
    solver = SolverConfig(curvature="ggn", damping=cfg.damping, damping_scale=cfg.damping_scale, damping_steps=5,
                          curvature_samples=64, batch_size=64, seed=cfg.seed, progress=cfg.progress)
    pc = PreconditionerConfig(kind="ekfac", batch_size=64, seed=cfg.seed, progress=cfg.progress,
                              samples=cfg.prep_samples, probes=0)
    return prepare(job.engine, solver, pc).preconditioner


__all__ = ["Surrogate", "SurrogateConfig"]
