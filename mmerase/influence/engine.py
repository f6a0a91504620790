"""InfluenceEngine: the edit gradient b, curvature products over the training set, and the solve (DESIGN.md §1–2)."""

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

from ..utils import batch_size_of, model_device, move_to
from . import vectors as V
from .config import SolverConfig
from .curvature import Curvature, make_curvature
from .damping import MAX_INCREASES, estimate_damping, raised_damping
from .distributed import all_reduce_, check_product_support, shard, world
from .edits import Edit
from .errors import InfluenceError, NotPositiveDefiniteError
from .solvers import SOLVERS, Preconditioner


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


def _dist_world() -> tuple[int, int]:
    return world()


class _Indexed:
    """A read-only view ``data[indices]`` of a sequence."""

    def __init__(self, data: Sequence, indices: Sequence[int]) -> None:
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.data[self.indices[i]]


class _Problem:
    """(H + λI) restricted to a sample set, with product counting; implements solvers.LinearProblem."""

    def __init__(self, engine: "InfluenceEngine", curvature: Curvature, config: SolverConfig, b: V.Vec,
                 curv_idx: list[int], resid_idx: list[int], preconditioner: Preconditioner | None = None,
                 extra: Callable[[V.Vec], V.Vec] | None = None) -> None:
        self.engine, self.curvature, self.config = engine, curvature, config
        self.extra = extra  # a deterministic term added to every product (the edits' curvature in refinement)
        self.preconditioner = preconditioner  # M ≈ (H+λI)⁻¹ for PCG; products stay exact
        self.b, self.damping = b, config.damping
        self.n_params = sum(t.numel() for t in b)
        self.curv_idx, self.resid_idx = curv_idx, resid_idx
        self.product_samples = 0
        self._gen = torch.Generator().manual_seed(config.seed)
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
    def _inference_mode(self) -> Iterator[None]:
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
        rank, world = _dist_world()
        for start in range(0, len(samples), batch_size):
            # every rank runs a pass per chunk (padding when its share is empty): ZeRO-3 needs lockstep
            for chunk, live in shard(range(start, min(start + batch_size, len(samples))), rank, world):
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
        with self._inference_mode():
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
        rank, world = _dist_world()
        with self._inference_mode():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                where = f"training samples {chunk[0]}–{chunk[-1]}"
                # padding passes (live=False) keep ranks in lockstep; their results are dropped
                for local, live in shard(chunk, rank, world, getattr(curv, "per_sample_passes", False)):
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
        with self._inference_mode():
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

    def _subset(self, size: int | None, seed: int) -> list[int]:
        if size is None or size >= self.n:
            return list(range(self.n))
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(self.n, generator=g)[:size].tolist())

    # ----------------------------------------------------------------- the solve
    def mean_gradient(self, indices: Sequence[int], batch_size: int) -> V.Vec:
        """∇ of the mean training loss over ``indices`` at the current parameters."""
        with self._inference_mode():
            total = self.gradient_sum(_Indexed(self.train_set, indices), batch_size, "training sample")
        return V.scale(1.0 / len(indices), total)

    def resolve_damping(self, config: SolverConfig, curvature: Curvature | None = None,
                        indices: list[int] | None = None) -> tuple[SolverConfig, dict[str, Any] | None]:
        """``config`` with damping='auto' replaced by its estimate from the curvature's spectrum over ``indices``
        (default: the curvature set), and what the estimate saw; a numeric damping passes through (info None)."""
        if not config.auto_damping:
            return config, None
        curv = curvature or make_curvature(config.curvature, fd_eps=config.fd_eps, ggn_jvp=config.ggn_jvp,
                                           seed=config.seed)
        idx = self._subset(config.curvature_samples, config.seed) if indices is None else indices
        used = [0]

        def matvec(v: V.Vec) -> V.Vec:
            used[0] += len(idx)
            return self.product(v, curv, idx, config.batch_size)

        try:
            lam, info = estimate_damping(matvec, self.params, config.damping_scale, config.damping_steps,
                                         seed=config.seed, progress=config.progress)
        except ValueError as e:
            raise InfluenceError(f"automatic damping: {e}") from e
        info["product_samples"] = used[0]
        return dataclasses.replace(config, damping=lam), info

    def solve(self, edits: Sequence[Edit], config: SolverConfig | None = None,
              preconditioner: Preconditioner | None = None,
              callback: Callable[[int, dict[str, torch.Tensor], dict[str, Any]], None] | None = None) -> SolveResult:
        """δ = (H + λI)⁻¹ b for the given edits, H the curvature of the mean training loss at the current θ.

        With ``config.refine_steps = K`` it then takes K Newton steps on the stationarity-corrected edited
        objective R̃_E(θ) = R(θ) − ∇R(θ̂)ᵀ(θ − θ̂) + (1/n) Σ_E [L(z_new; θ) − L(z_old; θ)] + (λ/2)‖θ − θ̂‖²,
        whose gradient at θ̂ is −b, so the first step is exactly the plain influence update and the later ones
        remove only the edit's higher-order (Taylor) error: not the adapter's distance from a training optimum
        (the correction term) and not the damping (kept as a proximal term; otherwise refinement would walk
        towards the undamped solution along the flat directions that damping exists to hold back). Refinement
        steps use R̃_E's own curvature, H + (1/n) Σ_E [C(z_new) − C(z_old)] (products over the few edited samples
        added), so removals converge quadratically too; each step is line-searched on R̃_E, and a step that raises
        the stationarity gap (a curvature that misreads R̃_E, e.g. GGN where the Hessian is indefinite) is undone
        and ends the refinement (``info['refinement']`` marks it ``rejected``). With
        ``config.refine_damping='step'`` λ damps each step instead (no proximal term; steps that raise the gap but
        lower R̃_E are kept), converging to R̃_E's own stationary point.
        ``result.info['stationarity_gap']`` = ‖∇R̃_E(θ̂+δ)‖ / ‖∇R̃_E(θ̂)‖ certifies how well δ solves the edit.

        ``callback(newton_step, delta, record)`` sees the update after each Newton step (1: the plain influence
        update), e.g. to evaluate every refinement step from one solve; the model holds θ̂ + delta meanwhile.

        ``preconditioner`` (e.g. from :func:`mmerase.influence.precondition.build_preconditioner`, or a saved
        preparation) makes 'cg' run preconditioned CG and 'stochastic' preconditioned SGD; the products and the
        stopping rule stay exact, so δ is the cold solve's to the tolerance, in fewer products.

        Raises :class:`InfluenceError` for bad input, ``NotPositiveDefiniteError`` when CG meets non-positive
        curvature, ``SolverDivergedError`` on NaN/inf or divergence; never returns a diverged δ. The model's
        parameters are unchanged on return (use :meth:`apply`).
        """
        config = config or SolverConfig()
        edits = self._check_edits(edits)
        if preconditioner is not None and hasattr(preconditioner, "check_fits"):
            preconditioner.check_fits(self.names, self.params)
        self._preconditioner = preconditioner
        t0 = time.perf_counter()
        curv = make_curvature(config.curvature, fd_eps=config.fd_eps, ggn_jvp=config.ggn_jvp, seed=config.seed)
        b = self.edit_gradient(edits, config.batch_size)
        b_norm = V.norm(b)
        if not V.is_finite(b):
            raise InfluenceError("the edit gradient b contains NaN/inf: check the edited samples' losses")
        curv_idx = self._subset(config.curvature_samples, config.seed)
        resid_idx = curv_idx if config.residual_samples is None else \
            sorted(self._subset(config.residual_samples, config.seed + 1) if config.curvature_samples is None
                   else curv_idx[: config.residual_samples])
        info: dict[str, Any] = {"n_train": self.n, "n_edits": len(edits), "curvature_set": len(curv_idx),
                                "residual_set": len(resid_idx)}
        if b_norm == 0.0:  # identical old and new samples: nothing to change
            zero = {n: torch.zeros_like(p) for n, p in zip(self.names, self.params)}
            return SolveResult(zero, 0.0, True, 0, [], 0.0, 0.0, 0, time.perf_counter() - t0, config.to_dict(),
                               {**info, "note": "b = 0: the edits do not change the objective"})

        if config.auto_damping and getattr(preconditioner, "damping", None):  # made for a λ: 'auto' means that one
            config = dataclasses.replace(config, damping=float(preconditioner.damping))
            damping_info: dict[str, Any] | None = {"rule": "the preconditioner's λ", "value": config.damping,
                                                   "increases": [], "product_samples": 0}
        else:
            config, damping_info = self.resolve_damping(config, curv, curv_idx)
        samples = 0
        if damping_info is not None:
            info["damping"] = damping_info
            samples += damping_info["product_samples"]
        out, used, config = self._damped_solve(curv, config, b, curv_idx, resid_idx, damping_info)
        samples += used
        x, history, steps = out.x, [dict(h, newton_step=1) for h in out.history], out.steps
        info.update(out.info)
        need_gap = config.refine_steps > 0 or config.stationarity_check
        if need_gap:
            g_hat = self.mean_gradient(curv_idx, config.batch_size)  # ∇R(θ̂), removed by the correction
            saved = [p.detach().clone() for p in self.params]
            refinement: list[dict[str, Any]] = []
            before: tuple[V.Vec, Any, SolverConfig] | None = None  # (x, out, config) before the last Newton step
            edit_samples = 2 * len(edits)
            proximal = config.refine_damping == "proximal"  # λ a term of R̃_E, not only of each step

            def edit_curvature(v: V.Vec) -> V.Vec:  # R̃_E's Hessian is H + the edits' own curvature
                nonlocal samples
                samples += edit_samples
                return self.edit_product(edits, v, curv, config.batch_size)

            try:
                for k in range(config.refine_steps + 1):
                    t_k = time.perf_counter()
                    self.set_parameters(saved, x)
                    grad = V.sub(V.sub(self.mean_gradient(curv_idx, config.batch_size), g_hat),
                                 self.edit_gradient(edits, config.batch_size))  # ∇R̃_E(θ̂ + x)
                    if config.damping and proximal:  # a term (λ/2)‖θ − θ̂‖²
                        grad = V.axpy(config.damping, x, grad)
                    gap = V.norm(grad) / b_norm
                    if proximal and before is not None and gap > refinement[-1]["stationarity_gap"]:
                        # the step lowered R̃_E yet moved away from its stationary point (a curvature that misreads
                        # R̃_E, e.g. GGN where the Hessian is indefinite): undo it and stop
                        refinement.append({"newton_step": k + 1, "stationarity_gap": gap, "rejected": True})
                        x, out, config = before  # with the λ that x was solved with (a step may have raised it)
                        if damping_info is not None:
                            damping_info["value"] = config.damping
                        break
                    refinement.append({"newton_step": k + 1, "stationarity_gap": gap})
                    if callback is not None:
                        callback(k + 1, self._named(x), refinement[-1])
                    if k == config.refine_steps:
                        break
                    config_before = config
                    step_out, step_samples, config = self._damped_solve(curv, config, V.scale(-1.0, grad),
                                                                        curv_idx, resid_idx, damping_info,
                                                                        edit_curvature)
                    samples += step_samples
                    steps += step_out.steps
                    history += [dict(h, newton_step=k + 2) for h in step_out.history]
                    # backtracking line search on R̃_E: a full Newton step can overshoot on a non-convex loss
                    f_x = self._edited_objective(saved, x, g_hat, edits, curv_idx, config)
                    t = 1.0
                    while t >= 1 / 16:
                        trial = V.axpy(t, step_out.x, x)
                        if self._edited_objective(saved, trial, g_hat, edits, curv_idx, config) < f_x:
                            break
                        t /= 2
                    refinement[-1].update(residual=step_out.residual, step_size=t if t >= 1 / 16 else 0.0,
                                          seconds=time.perf_counter() - t_k)
                    if t < 1 / 16:  # no decrease along the Newton direction: stop refining
                        break
                    before = (x, out, config_before)
                    x, out = trial, step_out
            finally:
                self.set_parameters(saved, None)
            info["stationarity_gap"] = [r for r in refinement if not r.get("rejected")][-1]["stationarity_gap"]
            info["refinement"] = refinement
        elif callback is not None:
            saved = [p.detach().clone() for p in self.params]
            try:
                self.set_parameters(saved, x)
                callback(1, self._named(x), {"newton_step": 1})
            finally:
                self.set_parameters(saved, None)
        delta = self._named(x)
        return SolveResult(delta=delta, residual=out.residual, converged=out.converged, steps=steps, history=history,
                           b_norm=b_norm, delta_norm=V.norm(x), product_samples=samples,
                           wall_time=time.perf_counter() - t0, config=config.to_dict(), info=info)

    def _named(self, x: V.Vec) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in zip(self.names, x)}

    def _edited_objective(self, base: V.Vec, x: V.Vec, g_hat: V.Vec, edits: list[Edit], idx: list[int],
                          config: SolverConfig) -> float:
        """R̃_E(θ̂ + x) up to a constant: the mean training loss, minus the stationarity correction ∇R(θ̂)ᵀx,
        plus the edits' (1/n)-weighted loss change and the proximal damping term."""
        self.set_parameters(base, x)
        with torch.no_grad(), self._inference_mode():
            train = self._loss_sum(_Indexed(self.train_set, idx), config.batch_size) / len(idx)
            new = self._loss_sum([e.new for e in edits if e.new is not None], config.batch_size)
            old = self._loss_sum([e.old for e in edits if e.old is not None], config.batch_size)
        prox = 0.5 * config.damping * V.dot(x, x) if config.refine_damping == "proximal" else 0.0
        return train - V.dot(g_hat, x) + (new - old) / self.n + prox

    def _loss_sum(self, samples: Sequence, batch_size: int) -> float:
        total = 0.0
        for start in range(0, len(samples), batch_size):
            chunk = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
            total += float(self.loss_fn(self.model, self.collate(chunk))) * len(chunk)
        return total

    def _linear_solve(self, curv: Curvature, config: SolverConfig, rhs: V.Vec, curv_idx: list[int],
                      resid_idx: list[int], extra: Callable[[V.Vec], V.Vec] | None = None) -> tuple[Any, int]:
        problem = _Problem(self, curv, config, rhs, curv_idx, resid_idx, getattr(self, "_preconditioner", None),
                           extra)
        try:
            with self._inference_mode():
                out = SOLVERS[config.method](problem, config)
        except NotPositiveDefiniteError as e:
            e.product_samples = problem.product_samples
            raise
        return out, problem.product_samples

    def _damped_solve(self, curv: Curvature, config: SolverConfig, rhs: V.Vec, curv_idx: list[int],
                      resid_idx: list[int], damping_info: dict[str, Any] | None,
                      extra: Callable[[V.Vec], V.Vec] | None = None) -> tuple[Any, int, SolverConfig]:
        """A linear solve; with automatic damping, non-positive curvature met by CG raises λ (up to MAX_INCREASES
        times, each recorded in ``damping_info['increases']``) and solves again. Returns the config used."""
        samples = 0
        while True:
            try:
                out, used = self._linear_solve(curv, config, rhs, curv_idx, resid_idx, extra)
                return out, samples + used, config
            except NotPositiveDefiniteError as e:
                samples += getattr(e, "product_samples", 0)
                if damping_info is None or e.rayleigh is None or len(damping_info["increases"]) >= MAX_INCREASES:
                    raise
                lam = raised_damping(config.damping, e.rayleigh)
                damping_info["increases"].append({"from": config.damping, "to": lam, "rayleigh": e.rayleigh})
                damping_info["value"] = lam
                config = dataclasses.replace(config, damping=lam)

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
