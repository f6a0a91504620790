"""InfluenceEngine: the edit gradient b, curvature products over the training set, and the solve (docs/design.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from ..utils import model_device, move_to
from . import vectors as V
from .config import SolverConfig
from .curvature import Curvature, make_curvature
from .distributed import all_reduce_, check_product_support, shard, world
from .edits import Edit
from .errors import InfluenceError
from .plan import SolvePlan, initial_damping, resolve
from .problem import Indexed, SolveState, damped_solve
from .refine import Callback, finish
from .solvers import Preconditioner


@dataclass
class SolveResult:
    """What a solve returns. ``delta`` is keyed like ``model.named_parameters()``."""

    delta: dict[str, torch.Tensor]
    residual: float
    converged: bool
    steps: int
    history: list[dict] = field(default_factory=list)
    b_norm: float = 0.0
    delta_norm: float = 0.0
    product_samples: int = 0
    wall_time: float = 0.0
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the tensors, for run records."""
        return {k: v for k, v in self.__dict__.items() if k != "delta"}


class InfluenceEngine:
    """Influence-function unlearning for the trainable parameters of any torch module.

    Args:
        model: any ``nn.Module``; the parameters with ``requires_grad=True`` are the ones unlearned
            (for a peft model: the adapter and any ``modules_to_save``).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the **mean over the batch's samples** of each
            sample's loss L(z). A :class:`~mmerase.influence.task.Task` also enables the 'ggn' curvature.
        train_set: the samples the model was trained on (a sequence); n = len(train_set).
        collate_fn: list of samples -> batch (default ``torch.utils.data.default_collate``). Batches are moved
            to the model's device.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 train_set: Sequence, collate_fn: Callable[[list], Any] | None = None) -> None:
        self.model, self.loss_fn, self.train_set = model, loss_fn, train_set
        self.collate_fn = collate_fn or default_collate
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise InfluenceError(
                "the model has no trainable parameters (none with requires_grad=True), so there is nothing to "
                "unlearn; for a peft model make sure the adapter is loaded with is_trainable=True"
            )
        if len(train_set) == 0:
            raise InfluenceError("train_set is empty: the influence update needs the training set (n ≥ 1)")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.n = len(train_set)
        self.device = model_device(model)

    # ----------------------------------------------------------------- building blocks
    def collate(self, samples: list) -> Any:
        """Collate a list of samples and move the batch to the model's device."""
        return move_to(self.collate_fn(list(samples)), self.device)

    def loss(self, batch: Any, where: str) -> torch.Tensor:
        """Call loss_fn and check that it returned a finite scalar that depends on the trainable parameters."""
        try:
            loss = self.loss_fn(self.model, batch)
        except Exception as e:  # the user's loss: name where it failed
            raise InfluenceError(f"loss_fn failed on {where}: {type(e).__name__}: {e}") from e
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InfluenceError(
                f"loss_fn must return a scalar tensor (the mean of the per-sample losses); got {shape} on {where}"
            )
        if not loss.requires_grad:
            raise InfluenceError(f"loss_fn's result on {where} does not depend on the trainable parameters")
        if not torch.isfinite(loss.detach()).all():
            raise InfluenceError(f"loss_fn returned {loss.item()} (not finite) on {where}")
        return loss.reshape(())

    @contextlib.contextmanager
    def inference_mode(self) -> Iterator[None]:
        """Dropout and similar off for the duration (products must be deterministic), restored afterwards.

        Modules flagged ``mmerase_keep_training = True`` stay in training mode: layers whose training mode only
        switches a code path, not randomness (gradient-checkpointed layers, which transformers checkpoints only in
        training mode; bitsandbytes 4-bit layers, whose eval-mode CPU path has no autograd).
        """
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        for m, _ in modes:
            if getattr(m, "mmerase_keep_training", False):
                m.training = True
        try:
            yield
        finally:
            for m, t in modes:
                m.training = t

    def gradient_sum(self, samples: Sequence, batch_size: int, what: str = "sample") -> V.Vec:
        """Σ_z ∇L(z) over ``samples``: each chunk's mean-loss gradient times its size, so the result does not
        depend on ``batch_size``. A chunk that fails is retried sample by sample to name the culprit."""
        total = [torch.zeros_like(p) for p in self.params]
        rank, size = world()
        for start in range(0, len(samples), batch_size):
            # every rank runs a pass per chunk (padding when its share is empty): ZeRO-3 needs lockstep
            for chunk, live in shard(range(start, min(start + batch_size, len(samples))), rank, size):
                try:
                    batch = self.collate([samples[i] for i in chunk])
                    loss = self.loss(batch, f"{what}s {chunk[0]}–{chunk[-1]}")
                except Exception:
                    for i in chunk:  # pinpoint the offending sample
                        self.loss(self._checked_collate(samples[i], f"{what} {i}"), f"{what} {i}")
                    raise
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                if live:
                    for t, g in zip(total, grads):
                        if g is not None:
                            t.add_(g, alpha=len(chunk))
        return self._all_reduce(total)

    def _checked_collate(self, sample: Any, where: str) -> Any:
        try:
            return self.collate([sample])
        except Exception as e:
            raise InfluenceError(f"collate_fn failed on {where}: {type(e).__name__}: {e}") from e

    def edit_gradient(self, edits: Sequence[Edit], batch_size: int = 16) -> V.Vec:
        """b = −(1/n) Σ_E [∇L(z_new) − ∇L(z_old)] at the current parameters (absent sides contribute 0)."""
        edits = self._check_edits(edits)
        with self.inference_mode():
            new = [e.new for e in edits if e.new is not None]
            old = [e.old for e in edits if e.old is not None]
            g_new = self.gradient_sum(new, batch_size, "new sample of edit") if new else V.zeros_like(self.params)
            g_old = self.gradient_sum(old, batch_size, "old sample of edit") if old else V.zeros_like(self.params)
        return [-(gn - go) / self.n for gn, go in zip(g_new, g_old)]

    def product(self, v: V.Vec | dict[str, torch.Tensor], curvature: str | Curvature = "hessian",
                indices: Sequence[int] | None = None, batch_size: int = 16) -> V.Vec:
        """C v over training samples ``indices`` (default: all), C the mean curvature over those samples.

        Each batch's product is weighted by its share of the samples, so the result is independent of
        ``batch_size`` and of the number of processes (products are all-reduced under torch.distributed).
        """
        curv = make_curvature(curvature) if isinstance(curvature, str) else curvature
        check_product_support(self.model, curv)
        v = self._as_list(v)
        idx = list(range(self.n)) if indices is None else list(indices)
        total = [torch.zeros_like(p) for p in self.params]
        rank, size = world()
        with self.inference_mode():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                where = f"training samples {chunk[0]}–{chunk[-1]}"
                # padding passes (live=False) keep ranks in lockstep; their results are dropped
                for local, live in shard(chunk, rank, size, getattr(curv, "per_sample_passes", False)):
                    hv = curv.batch_product(self, [self.train_set[i] for i in local], v, where)
                    if live:
                        for t, h in zip(total, hv):
                            t.add_(h.detach(), alpha=len(local) / len(idx))
        return self._all_reduce(total)

    def edit_product(self, edits: Sequence[Edit], v: V.Vec, curvature: str | Curvature = "hessian",
                     batch_size: int = 16) -> V.Vec:
        """(1/n) Σ_E [C(z_new) − C(z_old)] v: the curvature the edits add to the edited objective R_E, whose Hessian
        is H + this. Computed whole on every process (the edits are few), so no reduction is needed."""
        curv = make_curvature(curvature) if isinstance(curvature, str) else curvature
        v = self._as_list(v)
        total = [torch.zeros_like(p) for p in self.params]
        with self.inference_mode():
            for samples, sign, what in (([e.new for e in edits if e.new is not None], 1.0, "new"),
                                        ([e.old for e in edits if e.old is not None], -1.0, "old")):
                for start in range(0, len(samples), batch_size):
                    chunk = samples[start : start + batch_size]
                    hv = curv.batch_product(self, chunk, v, f"{what} samples of edits {start}–{start + len(chunk) - 1}")
                    for t, h in zip(total, hv):
                        t.add_(h.detach(), alpha=sign * len(chunk) / self.n)
        return total

    def _all_reduce(self, vec: V.Vec) -> V.Vec:
        return all_reduce_(vec)

    def _as_list(self, v: V.Vec | dict[str, torch.Tensor]) -> V.Vec:
        if isinstance(v, dict):
            missing = [n for n in self.names if n not in v]
            if missing:
                raise InfluenceError(f"vector is missing trainable parameter '{missing[0]}'")
            return [v[n].to(p) for n, p in zip(self.names, self.params)]
        if len(v) != len(self.params):
            raise InfluenceError(f"vector has {len(v)} tensors, the model has {len(self.params)} trainable ones")
        return [t.to(p) for t, p in zip(v, self.params)]

    @staticmethod
    def _check_edits(edits: Sequence[Edit]) -> list[Edit]:
        edits = list(edits)
        if not edits:
            raise InfluenceError("no edits given: pass at least one Edit(old, new)")
        for i, e in enumerate(edits):
            if not isinstance(e, Edit):
                raise InfluenceError(f"edit #{i} is a {type(e).__name__}, not an mmerase.Edit")
        return edits

    def subset(self, size: int | None, seed: int) -> list[int]:
        """A fixed random subset of ``size`` training indices for ``seed`` (sorted; all of them when size is None)."""
        if size is None or size >= self.n:
            return list(range(self.n))
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(self.n, generator=g)[:size].tolist())

    # ----------------------------------------------------------------- the solve
    def mean_gradient(self, indices: Sequence[int], batch_size: int) -> V.Vec:
        """∇ of the mean training loss over ``indices`` at the current parameters."""
        with self.inference_mode():
            total = self.gradient_sum(Indexed(self.train_set, indices), batch_size, "training sample")
        return V.scale(1.0 / len(indices), total)

    def damping_for(self, plan: SolvePlan | SolverConfig, indices: list[int] | None = None
                    ) -> tuple[float, dict[str, Any] | None]:
        """The λ a solve under ``plan`` starts from and how it was found (:func:`.plan.initial_damping`), with
        products over ``indices`` (default: the plan's curvature set)."""
        plan = plan if isinstance(plan, SolvePlan) else resolve(plan)
        cfg = plan.config
        idx = self.subset(cfg.curvature_samples, cfg.seed) if indices is None else indices
        return initial_damping(plan, lambda v: self.product(v, plan.curvature, idx, cfg.batch_size), self.params,
                               len(idx))

    def solve_sets(self, config: SolverConfig) -> tuple[list[int], list[int]]:
        """(curvature set, residual set): the training indices products run over, and those the stochastic solvers
        measure their residual on."""
        curv_idx = self.subset(config.curvature_samples, config.seed)
        if config.residual_samples is None:
            return curv_idx, curv_idx
        if config.curvature_samples is None:
            return curv_idx, sorted(self.subset(config.residual_samples, config.seed + 1))
        return curv_idx, sorted(curv_idx[: config.residual_samples])

    def solve(self, edits: Sequence[Edit], config: SolverConfig | SolvePlan | None = None,
              preconditioner: Preconditioner | None = None, callback: Callback | None = None) -> SolveResult:
        """δ = (H + λI)⁻¹ b for the given edits, H the curvature of the mean training loss at the current θ, then
        ``config.refine_steps`` Newton refinement steps on the edited objective (:mod:`.refine`).

        ``config`` is a :class:`SolverConfig` (resolved here, taking ``preconditioner``'s λ for damping='auto') or
        an already resolved :class:`~.plan.SolvePlan`. ``result.info['stationarity_gap']`` =
        ‖∇R̃_E(θ̂+δ)‖ / ‖∇R̃_E(θ̂)‖ certifies how well δ solves the edit; ``result.info['damping']`` says how an
        automatic λ was found.

        ``callback(newton_step, delta, record)`` sees the update after each Newton step (1: the plain influence
        update), e.g. to evaluate every refinement step from one solve; the model holds θ̂ + delta meanwhile.

        ``preconditioner`` (e.g. from :func:`mmerase.influence.precondition.build_preconditioner`, or a saved
        preparation) makes 'cg' run preconditioned CG and 'stochastic' preconditioned SGD; the products and the
        stopping rule stay exact, so δ is the cold solve's to the tolerance, in fewer products.

        Raises :class:`InfluenceError` for bad input, ``NotPositiveDefiniteError`` when CG meets non-positive
        curvature, ``SolverDivergedError`` on NaN/inf or divergence; never returns a diverged δ. The model's
        parameters are unchanged on return (use :meth:`apply`).
        """
        plan = config if isinstance(config, SolvePlan) else resolve(
            config or SolverConfig(), preparation_damping=getattr(preconditioner, "damping", None))
        edits = self._check_edits(edits)
        if preconditioner is not None and hasattr(preconditioner, "check_fits"):
            preconditioner.check_fits(self.names, self.params)
        t0 = time.perf_counter()
        cfg = plan.config
        b = self.edit_gradient(edits, cfg.batch_size)
        b_norm = V.norm(b)
        if not V.is_finite(b):
            raise InfluenceError("the edit gradient b contains NaN/inf: check the edited samples' losses")
        curv_idx, resid_idx = self.solve_sets(cfg)
        info: dict[str, Any] = {"n_train": self.n, "n_edits": len(edits), "curvature_set": len(curv_idx),
                                "residual_set": len(resid_idx)}
        if b_norm == 0.0:  # identical old and new samples: nothing to change
            zero = {n: torch.zeros_like(p) for n, p in zip(self.names, self.params)}
            return SolveResult(zero, 0.0, True, 0, [], 0.0, 0.0, 0, time.perf_counter() - t0, cfg.to_dict(),
                               {**info, "note": "b = 0: the edits do not change the objective"})
        lam, damping_info = self.damping_for(plan, curv_idx)
        state = SolveState(self, plan.curvature, dataclasses.replace(cfg, damping=lam), b, curv_idx, resid_idx,
                           preconditioner, damping_info, samples=(damping_info or {}).get("product_samples", 0))
        if damping_info is not None:
            info["damping"] = damping_info
        out = damped_solve(state, b)
        history = [dict(h, newton_step=1) for h in out.history]
        info.update(out.info)
        x, out, steps, refined = finish(state, edits, out.x, out, history, out.steps, b_norm, callback)
        info.update(refined)
        return SolveResult(delta=self.named(x), residual=out.residual, converged=out.converged, steps=steps,
                           history=history, b_norm=b_norm, delta_norm=V.norm(x), product_samples=state.samples,
                           wall_time=time.perf_counter() - t0, config=state.config.to_dict(), info=info)

    def named(self, x: V.Vec) -> dict[str, torch.Tensor]:
        """A parameter-shaped vector as ``{name: tensor}`` (detached copies), like ``model.named_parameters()``."""
        return {n: t.detach().clone() for n, t in zip(self.names, x)}

    def loss_sum(self, samples: Sequence, batch_size: int) -> float:
        """Σ_z L(z) over ``samples`` at the current parameters (no gradients; call inside no_grad)."""
        total = 0.0
        for start in range(0, len(samples), batch_size):
            chunk = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
            total += float(self.loss_fn(self.model, self.collate(chunk))) * len(chunk)
        return total

    def set_parameters(self, base: V.Vec, offset: V.Vec | None = None) -> None:
        """θ ← base (+ offset), exactly: e.g. to evaluate θ̂ + δ for several candidate δ and return to θ̂ without the
        rounding drift of apply(δ) / apply(δ, alpha=-1)."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(base[i] if offset is None else base[i] + offset[i])

    def apply(self, delta: dict[str, torch.Tensor] | V.Vec, alpha: float = 1.0) -> None:
        """θ ← θ + alpha·δ in place."""
        d = self._as_list(delta)
        with torch.no_grad():
            for p, t in zip(self.params, d):
                p.add_(t, alpha=alpha)
