"""Curvature-vector products C_B v for one batch B, C the Hessian of the batch-mean loss or a PSD surrogate.

Every backend takes the same inputs and returns a list of tensors aligned with the trainable parameters.
The engine weights and sums the per-batch results into products over the training set.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import torch

from .errors import InfluenceError
from .registry import CURVATURES, register_curvature
from .task import Task
from .vectors import Vec, norm


class ProductContext(Protocol):
    """What a curvature backend needs from the engine."""

    model: torch.nn.Module
    params: list[torch.Tensor]
    loss_fn: Any

    def loss(self, batch: Any, where: str) -> torch.Tensor: ...

    def collate(self, samples: list) -> Any: ...


def _grads(out: torch.Tensor, params: list[torch.Tensor], **kw: Any) -> Vec:
    gs = torch.autograd.grad(out, params, allow_unused=True, **kw)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The least precise floating dtype among the model's parameters and buffers: the precision its forward pass
    rounds to (a float32 adapter on a bf16 base computes in bf16; NF4 layers compute in their bf16/fp16 dtype)."""
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    dtypes |= {m.compute_dtype for m in model.modules() if isinstance(getattr(m, "compute_dtype", None), torch.dtype)}
    return max(dtypes or {torch.float32}, key=lambda d: torch.finfo(d).eps)


def _fd_step(params: list[torch.Tensor], v: Vec, fd_eps: float | None, model: torch.nn.Module | None = None,
             ) -> float:
    """Finite-difference step along v: fd_eps × max(1, ‖θ‖) / ‖v‖; default fd_eps = cbrt(machine eps of the
    precision the model computes in), which balances truncation (∝ε²) against rounding (∝eps/ε): ≈6e-6 in float64,
    ≈5e-3 in float32, ≈0.2 on a bf16 base, whose products are then good to a few percent at best (eps^(2/3))."""
    if fd_eps is not None:
        base = fd_eps
    else:
        dtype = compute_dtype(model) if model is not None else params[0].dtype
        base = max(torch.finfo(dtype).eps, torch.finfo(params[0].dtype).eps) ** (1.0 / 3.0)
    vn = norm(v)
    return base * max(1.0, norm(params)) / vn if vn > 0 else 0.0


class _Perturbed:
    """Context manager: θ ← θ₀ + t·v in place, restored exactly (from a copy) on exit."""

    def __init__(self, params: list[torch.Tensor], v: Vec, t: float) -> None:
        self.params, self.v, self.t = params, v, t

    def __enter__(self) -> None:
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, vi in zip(self.params, self.v):
                p.add_(vi.to(p.dtype), alpha=self.t)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved):
                p.copy_(s)


class Curvature:
    """Base class: ``batch_product(ctx, samples, v)`` = C_B v for the batch-mean loss over ``samples``."""

    name = "base"
    psd = False  # positive semi-definite by construction
    needs_second_order = False  # needs a differentiable backward (not under ZeRO-3)
    per_sample_passes = False  # runs passes per sample, not per batch (data-parallel padding, see .distributed)

    def __init__(self, fd_eps: float | None = None, ggn_jvp: str | None = "autograd", seed: int = 0) -> None:
        self.fd_eps, self.ggn_jvp, self.seed = fd_eps, ggn_jvp or "autograd", seed

    def batch_product(self, ctx: ProductContext, samples: list, v: Vec, where: str) -> Vec:
        raise NotImplementedError


@register_curvature
class ExactHessian(Curvature):
    """Pearlmutter's trick: H v = ∇(∇L · v), one double backward (≈2 gradients)."""

    name = "hessian"
    needs_second_order = True

    def batch_product(self, ctx, samples, v, where):
        loss = ctx.loss(ctx.collate(samples), where)
        g = torch.autograd.grad(loss, ctx.params, create_graph=True, allow_unused=True)
        gv = sum((gi * vi).sum() for gi, vi in zip(g, v) if gi is not None)
        if not isinstance(gv, torch.Tensor) or not gv.requires_grad:  # loss linear in θ: H = 0
            return [torch.zeros_like(p) for p in ctx.params]
        return _grads(gv, ctx.params)


@register_curvature
class FiniteDifferenceHessian(Curvature):
    """(∇L(θ+εv) − ∇L(θ−εv)) / 2ε: first-order passes only, O(ε²) truncation error."""

    name = "fd-hessian"

    def batch_product(self, ctx, samples, v, where):
        eps = _fd_step(ctx.params, v, self.fd_eps, ctx.model)
        if eps == 0.0:
            return [torch.zeros_like(p) for p in ctx.params]
        batch = ctx.collate(samples)
        grads = []
        for sign in (1.0, -1.0):
            with _Perturbed(ctx.params, v, sign * eps):
                grads.append(_grads(ctx.loss(batch, where), ctx.params))
        return [(gp - gm) / (2 * eps) for gp, gm in zip(*grads)]


@register_curvature
class GaussNewton(Curvature):
    """Jᵀ H_out J v, with J the Jacobian of the Task's outputs and H_out the Hessian of the loss in them (PSD
    for convex output losses such as cross-entropy)."""

    name = "ggn"
    psd = True

    @property
    def needs_second_order(self) -> bool:  # type: ignore[override]
        return self.ggn_jvp == "autograd"

    def batch_product(self, ctx, samples, v, where):
        task = ctx.loss_fn
        if not isinstance(task, Task):
            raise InfluenceError(
                "curvature 'ggn' needs the loss split into outputs and a loss on them: pass a "
                "mmerase.influence.Task as loss_fn (a plain callable supports 'hessian', 'fd-hessian', 'fisher')"
            )
        batch = ctx.collate(samples)
        if self.ggn_jvp == "autograd":
            out = task.outputs(ctx.model, batch)
            u = torch.zeros_like(out, requires_grad=True)
            jt_u = torch.autograd.grad(out, ctx.params, grad_outputs=u, create_graph=True, allow_unused=True)
            pairs = [(g, vi) for g, vi in zip(jt_u, v) if g is not None]
            jv = torch.autograd.grad([g for g, _ in pairs], u, grad_outputs=[vi for _, vi in pairs])[0]
        else:  # perturbed forwards first: the in-place perturbation would invalidate out's graph
            eps = _fd_step(ctx.params, v, self.fd_eps, ctx.model)
            if eps == 0.0:
                return [torch.zeros_like(p) for p in ctx.params]
            with torch.no_grad():
                with _Perturbed(ctx.params, v, eps):
                    plus = task.outputs(ctx.model, batch)
                with _Perturbed(ctx.params, v, -eps):
                    minus = task.outputs(ctx.model, batch)
            jv = (plus - minus) / (2 * eps)
            out = task.outputs(ctx.model, batch)
        z = out.detach().requires_grad_(True)
        gz = torch.autograd.grad(task.loss_from_outputs(z, batch), z, create_graph=True)[0]
        h_jv = torch.autograd.grad(gz, z, grad_outputs=jv)[0]
        return _grads(out, ctx.params, grad_outputs=h_jv)


@register_curvature
class EmpiricalFisher(Curvature):
    """(1/m) Σ_i g_i g_iᵀ v with g_i the gradient of sample i's loss (PSD; one gradient per sample)."""

    name = "fisher"
    psd = True
    per_sample_passes = True

    def batch_product(self, ctx, samples, v, where):
        out = [torch.zeros_like(p) for p in ctx.params]
        for k, s in enumerate(samples):
            g = _grads(ctx.loss(ctx.collate([s]), f"{where}, sample {k}"), ctx.params)
            coef = sum(float((gi * vi).sum()) for gi, vi in zip(g, v)) / len(samples)
            for o, gi in zip(out, g):
                o.add_(gi, alpha=coef)
        return out


def _draw_seed(seed: int, batch: Any) -> int:
    """A seed from ``seed`` and the contents of a one-sample batch: a sample's label draws are the same in every
    product, on any rank, whatever batch it is in."""
    h = hashlib.sha256(str(seed).encode())
    stack = [batch]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            h.update(str((x.dtype, tuple(x.shape))).encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            stack += [x[k] for k in sorted(x, reverse=True)]
        elif isinstance(x, (list, tuple)):
            stack += list(reversed(x))
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


@register_curvature
class SampledFisher(Curvature):
    """The true Fisher by Monte Carlo: (1/m) Σ_i T_i g̃_i g̃_iᵀ v, g̃_i the gradient of sample i's loss on targets
    drawn from the model's own predictive distribution (``Task.sample_targets``), T_i = ``Task.label_count`` (PSD).

    Why T_i: for a per-sample *mean* over T independent categorical outputs (a response's tokens),
    L = (1/T) Σ_t ℓ_t, E[∇ℓ_t] = 0 under the model's distribution and the tokens are drawn independently, so
    E[g̃ g̃ᵀ] = (1/T²) Σ_t J_tᵀ(diag p_t − p_t p_tᵀ)J_t = GGN(L)/T; the factor T makes the estimate unbiased for the
    GGN (= the Fisher for softmax cross-entropy). One draw per sample, keyed by ``seed`` and the sample's content,
    so the operator is fixed during a solve (as CG needs) and does not depend on batching or the number of ranks.
    """

    name = "sampled-fisher"
    psd = True
    per_sample_passes = True

    def batch_product(self, ctx, samples, v, where):
        task = ctx.loss_fn
        if not isinstance(task, Task):
            raise InfluenceError(
                "curvature 'sampled-fisher' draws targets from the model's outputs: pass a mmerase.influence.Task "
                "as loss_fn (a plain callable supports 'hessian', 'fd-hessian', 'fisher')")
        out = [torch.zeros_like(p) for p in ctx.params]
        for k, s in enumerate(samples):
            batch = ctx.collate([s])
            logits = task.outputs(ctx.model, batch)
            gen = torch.Generator().manual_seed(_draw_seed(self.seed, batch))
            drawn = task.sample_targets(logits.detach(), batch, gen)
            loss = task.loss_from_outputs(logits, drawn)
            g = _grads(loss, ctx.params)
            coef = float(task.label_count(drawn)) * sum(float((gi * vi).sum()) for gi, vi in zip(g, v))
            for o, gi in zip(out, g):
                o.add_(gi, alpha=coef / len(samples))
        return out


def make_curvature(name: str, fd_eps: float | None = None, ggn_jvp: str | None = "autograd", seed: int = 0
                   ) -> Curvature:
    """The curvature backend ``name``; ``seed`` fixes the label draws of 'sampled-fisher'."""
    try:
        return CURVATURES[name](fd_eps=fd_eps, ggn_jvp=ggn_jvp, seed=seed)
    except KeyError:
        raise InfluenceError(f"unknown curvature '{name}'; choose one of: {', '.join(CURVATURES)}") from None
