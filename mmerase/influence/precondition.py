"""Preconditioners for (H + λI): built once from the training set, reused by every later request.

A preconditioner M ≈ (H + λI)⁻¹ only changes how fast preconditioned CG converges, never its answer: the solver
still multiplies by the exact H and stops on the exact residual. Three families, each built from the engine's own
products or gradient passes, so they serve any model and any curvature:

- ``diagonal``: the diagonal of a Monte-Carlo Gauss-Newton (sampled-label Fisher) estimate, from per-sample
  gradients of every trainable ``nn.Linear`` (other trainable tensors get the mean diagonal).
- ``kfac`` / ``ekfac``: per trainable linear layer (LoRA ``A`` and ``B`` are linear layers, and so is a trainable
  projector), Kronecker factors A = E[a aᵀ] of the inputs and G = E[g gᵀ] of the output gradients; ``ekfac``
  replaces the eigenvalues λ_G ⊗ λ_A by the second moments of per-sample gradients in that eigenbasis.
- ``lowrank``: k Lanczos steps with exact products give the top eigenpairs (μ, V) of H; then
  M = V diag(1/(μ+λ)) Vᵀ + (I − VVᵀ)/(μ_k + λ) (Nyström-PCG style: the tail is scaled like the smallest kept pair;
  only converged Ritz pairs are kept, so an inaccurate small Ritz value cannot blow the tail up).

Measured on LoRA adapters (tests, ``benchmarks/request_reuse.md``): ``lowrank`` cuts CG steps; the block-diagonal
ones (``diagonal``, ``kfac``, ``ekfac``) can *increase* them, even with the exact diagonal, because LoRA's A and B
factors (and layers) are strongly coupled, which a block-diagonal M ignores. They stay exact (PCG with any SPD M
is) and cost only gradient passes, so they remain useful as the approximate one-step answer's direction.

The Monte-Carlo estimates have the right shape but not necessarily the right scale for the curvature asked for
(a sampled Fisher of a token-mean loss is the Gauss-Newton matrix divided by the token count); a global factor c
is therefore calibrated by matching vᵀCv to vᵀĈv on a few random probes with exact products C.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from . import vectors as V
from ..options import option
from .curvature import Curvature, make_curvature
from .engine import InfluenceEngine
from .errors import InfluenceError
from .lanczos import lanczos
from .task import Task


KINDS = ("diagonal", "kfac", "ekfac", "lowrank")
#: a Ritz pair (θ, y) is kept when ‖C y − θ y‖ ≤ RITZ_TOL·θ
RITZ_TOL = 0.1


@dataclass
class PreconditionerConfig:
    """How to build a preconditioner (each field's help says what it does; see the module docstring for the kinds).

    ``samples``: the solver's exact products stay on the whole curvature set, so a sub-sampled preconditioner costs
    steps, not accuracy. ``seed`` makes subsets, sampled labels, probes and the Lanczos start vector deterministic.
    """

    kind: str = option("lowrank", choices=KINDS, help=(
        "lowrank: top eigenpairs by Lanczos (exact on them; the one that cuts CG steps on LoRA); ekfac / kfac: "
        "per-layer Kronecker factors; diagonal"))
    rank: int = option(32, help="Lanczos steps for --kind lowrank (one curvature product each)")
    samples: int | None = option(None, flag="--prepare-samples", help=(
        "build from a fixed random subset of this many training samples (default: all); requests stay exact"))
    batch_size: int = option(16, help="samples per gradient pass / product")
    probes: int = option(2, help="exact products calibrating the scale of ekfac / kfac / diagonal (0: none)")
    probe_samples: int | None = option(64, help="training samples each calibration probe multiplies over "
                                       "(default: all build samples)")
    sampled_labels: bool = option(True, help=(
        "draw targets from the model (a Monte-Carlo Gauss-Newton) for ekfac / kfac / diagonal; otherwise the "
        "empirical Fisher (the training labels)"))
    mc_samples: int = option(1, help="target draws per sample and pass (less Monte-Carlo noise in small builds)")
    seed: int = option(0, help="seed of subsets, sampled labels, probes and the Lanczos start vector")
    progress: bool | None = option(None, help="progress bars (default: only on a terminal)")

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown preconditioner kind '{self.kind}'; choose one of: {', '.join(KINDS)}")
        for name in ("rank", "batch_size", "mc_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if int(self.probes) < 0:
            raise ValueError(f"probes must be ≥ 0, got {self.probes}")
        if self.samples is not None and int(self.samples) < 1:
            raise ValueError(f"samples must be ≥ 1 or None, got {self.samples}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- preconditioners
class Preconditioner:
    """M ≈ (H + λI)⁻¹ on parameter-shaped vectors, saved as named tensors plus JSON metadata.

    ``names``/``shapes`` are the trainable parameters it was built for, ``damping`` the λ it includes; ``meta``
    holds how it was built (kind-specific numbers, timings).
    """

    kind: ClassVar[str] = "base"
    #: its scale comes from exact products (not an estimate): a one-step answer M b needs no step-length search
    trusted_scale: ClassVar[bool] = False

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], damping: float,
                 meta: dict[str, Any] | None = None) -> None:
        self.names, self.shapes = list(names), [tuple(int(d) for d in s) for s in shapes]
        self.damping = float(damping)
        self.meta = dict(meta or {})

    def apply(self, r: V.Vec) -> V.Vec:
        """M r."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors to save (contiguous, CPU)."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> "Preconditioner":
        raise NotImplementedError

    def check_state(self) -> None:
        """Raise ``ValueError`` naming the first loaded tensor whose shape does not fit the parameters it was built
        for (a tampered or mismatched preparation), instead of a shape error in the middle of a solve."""

    def info(self) -> dict[str, Any]:
        """JSON-able description (everything but the tensors)."""
        return {"kind": self.kind, "names": self.names, "shapes": [list(s) for s in self.shapes],
                "damping": self.damping, "meta": self.meta}

    def check_fits(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        """Raise :class:`InfluenceError` naming the first trainable parameter that differs from the built ones."""
        shapes = [tuple(p.shape) for p in params]
        if list(names) == self.names and shapes == self.shapes:
            return
        built = dict(zip(self.names, self.shapes))
        for n, s in zip(names, shapes):
            if n not in built:
                raise InfluenceError(f"the preconditioner was built for other trainable parameters: '{n}' is not "
                                     f"among its {len(self.names)} parameters (prepare again for this adapter)")
            if built[n] != s:
                raise InfluenceError(f"the preconditioner was built for '{n}' of shape {list(built[n])}, this "
                                     f"model's is {list(s)} (prepare again for this adapter)")
        missing = [n for n in self.names if n not in set(names)]
        raise InfluenceError(f"the preconditioner covers parameter '{missing[0] if missing else '?'}' that this "
                             "model does not train (prepare again for this adapter)")


def _to_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype)


class DiagonalPreconditioner(Preconditioner):
    """M = diag(1 / (c·d + λ)) with d ≥ 0 the estimated curvature diagonal and c its calibrated scale."""

    kind = "diagonal"

    def __init__(self, names, shapes, damping, diag: V.Vec, scale: float = 1.0, meta=None) -> None:
        super().__init__(names, shapes, damping, meta)
        self.diag, self.scale = [d.clamp_min(0) for d in diag], float(scale)
        self._inv: V.Vec | None = None

    def _inverse(self, like: V.Vec) -> V.Vec:
        if self._inv is None or self._inv[0].device != like[0].device or self._inv[0].dtype != like[0].dtype:
            self._inv = [1.0 / (_to_like(d, t) * self.scale + self.damping) for d, t in zip(self.diag, like)]
        return self._inv

    def apply(self, r):
        return [ri * di for ri, di in zip(r, self._inverse(r))]

    def approx_matvec(self, v: V.Vec) -> V.Vec:
        """Ĉ v with the uncalibrated estimate (for the scale calibration)."""
        return [vi * _to_like(d, vi) for vi, d in zip(v, self.diag)]

    def state(self):
        return {f"diag.{i}": d.detach().cpu().contiguous() for i, d in enumerate(self.diag)}

    def check_state(self):
        _check_count(self.names, self.shapes)
        for i, (d, s) in enumerate(zip(self.diag, self.shapes)):
            _check_shape(f"diag.{i}", d, s)

    @classmethod
    def from_state(cls, tensors, info):
        diag = [tensors[f"diag.{i}"] for i in range(len(info["names"]))]
        return cls(info["names"], info["shapes"], info["damping"], diag, info["meta"].get("scale", 1.0),
                   info["meta"])


@dataclass
class _Block:
    """One trainable linear layer: indices of its weight (and bias) in the parameter list, and its factors."""

    module: str
    weight: int
    bias: int | None
    q_a: torch.Tensor  # [in(+1), in(+1)] eigenvectors of the input factor
    q_g: torch.Tensor  # [out, out] eigenvectors of the output-gradient factor
    eig: torch.Tensor  # [out, in(+1)] eigenvalues in the Kronecker eigenbasis (λ_G λ_Aᵀ or EK-FAC moments)


class KroneckerPreconditioner(Preconditioner):
    """Per linear layer M = Q (c·Λ + λ)⁻¹ Qᵀ with Q = Q_G ⊗ Q_A (K-FAC or EK-FAC); other parameters diagonal."""

    kind = "ekfac"

    def __init__(self, names, shapes, damping, blocks: list[_Block], rest: dict[int, torch.Tensor],
                 scale: float = 1.0, kind: str = "ekfac", meta=None) -> None:
        super().__init__(names, shapes, damping, meta)
        self.blocks, self.rest, self.scale = blocks, rest, float(scale)
        self.kind = kind  # type: ignore[misc]

    def _per_block(self, r: V.Vec, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> V.Vec:
        out: V.Vec = [None] * len(r)  # type: ignore[list-item]
        for blk in self.blocks:
            w = r[blk.weight]
            m = w if blk.bias is None else torch.cat([w, r[blk.bias].unsqueeze(1)], dim=1)
            q_a, q_g = _to_like(blk.q_a, w), _to_like(blk.q_g, w)
            rot = q_g.T @ m @ q_a
            res = q_g @ fn(rot, _to_like(blk.eig, w)) @ q_a.T
            if blk.bias is None:
                out[blk.weight] = res
            else:
                out[blk.weight], out[blk.bias] = res[:, :-1].contiguous(), res[:, -1].contiguous()
        for i, d in self.rest.items():
            out[i] = fn(r[i], _to_like(d, r[i]).expand_as(r[i]))
        return out

    def apply(self, r):
        return self._per_block(r, lambda x, e: x / (self.scale * e.clamp_min(0) + self.damping))

    def approx_matvec(self, v: V.Vec) -> V.Vec:
        return self._per_block(v, lambda x, e: x * e.clamp_min(0))

    def state(self):
        t: dict[str, torch.Tensor] = {}
        for k, blk in enumerate(self.blocks):
            t[f"block.{k}.q_a"], t[f"block.{k}.q_g"] = blk.q_a.contiguous(), blk.q_g.contiguous()
            t[f"block.{k}.eig"] = blk.eig.contiguous()
        for i, d in self.rest.items():
            t[f"rest.{i}"] = d.reshape(1).contiguous()
        return t

    def check_state(self):
        _check_count(self.names, self.shapes)
        for k, blk in enumerate(self.blocks):
            out, inp = _matrix_shape(self.shapes, blk.weight)
            if blk.bias is not None:
                if (not isinstance(blk.bias, int) or not 0 <= blk.bias < len(self.shapes)
                        or self.shapes[blk.bias] != (out,)):
                    raise ValueError(f"block {k}: bias index {blk.bias!r} is not a bias of {out} values")
                inp += 1
            _check_shape(f"block.{k}.q_a", blk.q_a, (inp, inp))
            _check_shape(f"block.{k}.q_g", blk.q_g, (out, out))
            _check_shape(f"block.{k}.eig", blk.eig, (out, inp))
        for i, d in self.rest.items():
            if not 0 <= i < len(self.shapes):
                raise ValueError(f"rest.{i} names no parameter (there are {len(self.shapes)})")
            _check_shape(f"rest.{i}", d, (1,))

    def info(self):
        out = super().info()
        out["blocks"] = [{"module": b.module, "weight": b.weight, "bias": b.bias} for b in self.blocks]
        out["rest"] = sorted(self.rest)
        return out

    @classmethod
    def from_state(cls, tensors, info):
        blocks = [_Block(b["module"], b["weight"], b["bias"], tensors[f"block.{k}.q_a"], tensors[f"block.{k}.q_g"],
                         tensors[f"block.{k}.eig"]) for k, b in enumerate(info["blocks"])]
        rest = {int(i): tensors[f"rest.{i}"] for i in info["rest"]}
        return cls(info["names"], info["shapes"], info["damping"], blocks, rest, info["meta"].get("scale", 1.0),
                   info["kind"], info["meta"])


class LowRankPreconditioner(Preconditioner):
    """M = V diag(1/(μ+λ)) Vᵀ + (I − VVᵀ)/(τ+λ): exact inverse on the top eigenspace, scalar on the rest."""

    kind = "lowrank"
    trusted_scale = True

    def __init__(self, names, shapes, damping, basis: torch.Tensor, values: torch.Tensor, tail: float,
                 meta=None) -> None:
        super().__init__(names, shapes, damping, meta)
        self.basis, self.values, self.tail = basis, values, float(tail)  # basis: [k, n_params], orthonormal rows

    def apply(self, r):
        flat = V.flatten(r)
        basis = _to_like(self.basis, flat)
        coef = basis @ flat
        inv = 1.0 / (_to_like(self.values, flat) + self.damping)
        out = basis.T @ (coef * inv) + (flat - basis.T @ coef) / (self.tail + self.damping)
        return V.unflatten(out, r)

    def state(self):
        return {"basis": self.basis.contiguous(), "values": self.values.contiguous()}

    def check_state(self):
        _check_count(self.names, self.shapes)
        n = sum(math.prod(s) for s in self.shapes)
        if self.basis.dim() != 2 or self.basis.shape[1] != n:
            raise ValueError(f"basis has shape {list(self.basis.shape)}, the parameters need [k, {n}]")
        _check_shape("values", self.values, (self.basis.shape[0],))
        if not math.isfinite(self.tail):
            raise ValueError(f"tail {self.tail} is not finite")

    @classmethod
    def from_state(cls, tensors, info):
        return cls(info["names"], info["shapes"], info["damping"], tensors["basis"], tensors["values"],
                   info["meta"]["tail"], info["meta"])


def _check_count(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> None:
    if len(names) != len(shapes) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{len(names)} parameter name(s) for {len(shapes)} shape(s)")


def _check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")


def _matrix_shape(shapes: Sequence[tuple[int, ...]], index: Any) -> tuple[int, int]:
    if not isinstance(index, int) or not 0 <= index < len(shapes) or len(shapes[index]) != 2:
        raise ValueError(f"block weight index {index!r} is not a matrix parameter")
    out, inp = shapes[index]
    return out, inp


PRECONDITIONERS: dict[str, type[Preconditioner]] = {
    "diagonal": DiagonalPreconditioner, "kfac": KroneckerPreconditioner, "ekfac": KroneckerPreconditioner,
    "lowrank": LowRankPreconditioner,
}


def preconditioner_from_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Preconditioner:
    """Rebuild a saved preconditioner (``info`` as written by :meth:`Preconditioner.info`)."""
    try:
        cls = PRECONDITIONERS[info["kind"]]
    except KeyError:
        raise InfluenceError(f"unknown preconditioner kind {info.get('kind')!r} in the saved preparation") from None
    return cls.from_state(tensors, info)


# ----------------------------------------------------------------------------- building
def build_preconditioner(engine: InfluenceEngine, curvature: str | Curvature, damping: float,
                         config: PreconditionerConfig | None = None, *, fd_eps: float | None = None,
                         ggn_jvp: str = "autograd", curvature_seed: int = 0) -> Preconditioner:
    """Build a preconditioner for (C + λI), C = ``curvature`` of the mean training loss at the current θ.

    Costs (in passes over ``config.samples`` training samples): 'lowrank' ``rank`` products; 'diagonal' one
    gradient pass, 'kfac' one, 'ekfac' two, each plus ``probes`` products for the scale calibration.
    """
    config = config or PreconditionerConfig()
    if damping <= 0:
        raise InfluenceError("a preconditioner needs damping λ > 0 (its tail is scaled by 1/λ); set damping")
    t0 = time.perf_counter()
    idx = engine.subset(config.samples, config.seed)
    curv = curvature if isinstance(curvature, Curvature) else make_curvature(curvature, fd_eps=fd_eps,
                                                                             ggn_jvp=ggn_jvp, seed=curvature_seed)
    names, shapes = engine.names, [tuple(p.shape) for p in engine.params]
    meta: dict[str, Any] = {"config": config.to_dict(), "curvature": curv.name, "build_samples": len(idx),
                            "n_train": engine.n}
    products = product_samples = 0

    def exact(v: V.Vec, on: list[int] | None = None) -> V.Vec:
        nonlocal products, product_samples
        on = idx if on is None else on
        products += 1
        product_samples += len(on)
        return engine.product(v, curv, on, config.batch_size)

    if config.kind == "lowrank":
        values, basis, resid, info = lanczos(exact, engine.params, config.rank, seed=config.seed,
                                             progress=config.progress)
        # only converged pairs: an unconverged small Ritz value would set the tail scale far too low
        keep = (values > 0) & (resid.to(values) <= RITZ_TOL * values)  # CPU: from the tridiagonal problem
        keep[0] = keep[0] or bool(values[0] > 0)  # the top pair converges first; keep it regardless
        values, basis = values[keep], basis[keep.to(basis.device)]
        tail = float(values.min()) if len(values) else 0.0
        meta.update({k: v for k, v in info.items() if k != "tridiagonal"}, tail=tail, kept=int(keep.sum()))
        pre: Preconditioner = LowRankPreconditioner(names, shapes, damping, basis, values, tail, meta)
    else:
        stats = _gradient_statistics(engine, idx, config, eigenbasis=None)
        if config.kind == "diagonal":
            pre = DiagonalPreconditioner(names, shapes, damping, stats.diagonal(engine.params), meta=meta)
        else:
            blocks = stats.kronecker_blocks()
            if config.kind == "ekfac":
                again = _gradient_statistics(engine, idx, config, eigenbasis=blocks)
                blocks = again.corrected_blocks(blocks)
            pre = KroneckerPreconditioner(names, shapes, damping, blocks, stats.rest_diagonal(engine.params),
                                          kind=config.kind, meta=meta)
        meta["gradient_passes"] = 2 if config.kind == "ekfac" else 1
        probe_idx = idx if config.probe_samples is None or config.probe_samples >= len(idx) else \
            [idx[i] for i in sorted(torch.randperm(len(idx), generator=torch.Generator().manual_seed(
                config.seed + 3))[: config.probe_samples].tolist())]
        meta["scale"] = _calibrate(pre, lambda v: exact(v, probe_idx), engine.params, config) \
            if config.probes else 1.0
        pre.scale = meta["scale"]  # type: ignore[attr-defined]
    meta["products"], meta["product_samples"] = products, product_samples
    meta["seconds"] = time.perf_counter() - t0
    pre.meta = meta
    return pre


def _calibrate(pre: Preconditioner, exact: Callable[[V.Vec], V.Vec], params: Sequence[torch.Tensor],
               config: PreconditionerConfig) -> float:
    """c = Σ vᵀCv / Σ vᵀĈv over Rademacher probes v (a trace match between the exact and estimated curvature)."""
    g = torch.Generator().manual_seed(config.seed + 101)
    num = den = 0.0
    for _ in range(config.probes):
        v = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in params]
        num += V.dot(v, exact(v))
        den += V.dot(v, pre.approx_matvec(v))  # type: ignore[attr-defined]
    if not (num > 0 and den > 0 and math.isfinite(num / den)):
        return 1.0  # an indefinite or degenerate probe: keep the estimate's own scale
    return num / den


# ----------------------------------------------------------------------------- per-layer gradient statistics
def _linear_blocks(model: nn.Module, params: Sequence[torch.Tensor]) -> list[tuple[str, nn.Linear, int, int | None]]:
    """Trainable ``nn.Linear`` layers whose weight (and bias, if trainable) are among ``params``."""
    index = {id(p): i for i, p in enumerate(params)}
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) in index:
            bias = index.get(id(mod.bias)) if mod.bias is not None else None
            out.append((name, mod, index[id(mod.weight)], bias))
    return out


class _Stats:
    """Accumulates, per linear layer, A = Σ a aᵀ, G = Σ g gᵀ and the per-sample gradient second moments (entry
    by entry, or in a given Kronecker eigenbasis). A layer input's leading dimension must index samples (or one
    row per sample that has it, e.g. one image per sample for a projector)."""

    def __init__(self, blocks: list[tuple[str, nn.Linear, int, int | None]], eigenbasis: list[_Block] | None):
        self.blocks, self.eigenbasis = blocks, eigenbasis
        k = len(blocks)
        self.a: list[torch.Tensor | None] = [None] * k
        self.g: list[torch.Tensor | None] = [None] * k
        self.moment: list[torch.Tensor | None] = [None] * k  # Σ over samples of (per-sample grad)² (rotated)
        self.tokens = [0] * k
        self.n = 0
        self._inputs: list[torch.Tensor | None] = [None] * k
        self.scale = 1.0

    def hooks(self) -> list[Any]:
        handles = []
        for k, (_, mod, _, _) in enumerate(self.blocks):
            handles.append(mod.register_forward_hook(self._forward_hook(k)))
        return handles

    def _forward_hook(self, k: int) -> Callable:
        def hook(_mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            self._inputs[k] = inputs[0].detach()
            output.register_hook(lambda grad, k=k: self._accumulate(k, grad.detach()))
        return hook

    def _accumulate(self, k: int, grad: torch.Tensor) -> None:
        a = self._inputs[k]
        if a is None:
            return
        has_bias = self.blocks[k][3] is not None
        rows = a.shape[0] if a.dim() > 1 else 1
        a = a.reshape(rows, -1, a.shape[-1])
        g = grad.reshape(rows, -1, grad.shape[-1]) * self.scale  # undo the batch mean: per-sample gradients
        if has_bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        a64, g64 = a.double(), g.double()
        per_sample = torch.einsum("bto,bti->boi", g64, a64)  # each row's gradient of this layer
        if self.eigenbasis is None:
            fa, fg = a64.reshape(-1, a64.shape[-1]), g64.reshape(-1, g64.shape[-1])
            self.a[k] = _add(self.a[k], fa.T @ fa)
            self.g[k] = _add(self.g[k], fg.T @ fg)
            self.tokens[k] += fa.shape[0]
            self.moment[k] = _add(self.moment[k], (per_sample ** 2).sum(0))
        else:
            blk = self.eigenbasis[k]
            rot = blk.q_g.T.double() @ per_sample @ blk.q_a.double()
            self.moment[k] = _add(self.moment[k], (rot ** 2).sum(0))

    def end_batch(self) -> None:
        self._inputs = [None] * len(self.blocks)

    # ---- results
    def kronecker_blocks(self) -> list[_Block]:
        out = []
        for k, (name, _, wi, bi) in enumerate(self.blocks):
            if self.a[k] is None:
                raise InfluenceError(f"layer '{name}' received no gradient while building the preconditioner")
            la, qa = torch.linalg.eigh(self.a[k] / self.tokens[k])
            lg, qg = torch.linalg.eigh(self.g[k] / self.tokens[k])
            eig = torch.outer(lg.clamp_min(0), la.clamp_min(0)) * (self.tokens[k] / self.n)  # K-FAC "expand"
            out.append(_Block(name, wi, bi, qa, qg, eig))
        return out

    def corrected_blocks(self, blocks: list[_Block]) -> list[_Block]:
        return [_Block(b.module, b.weight, b.bias, b.q_a, b.q_g, self.moment[k] / self.n)
                for k, b in enumerate(blocks)]

    def diagonal(self, params: Sequence[torch.Tensor]) -> V.Vec:
        diag: V.Vec = [None] * len(params)  # type: ignore[list-item]
        for k, (_, _, wi, bi) in enumerate(self.blocks):
            m = self.moment[k] / self.n
            diag[wi] = m if bi is None else m[:, :-1]
            if bi is not None:
                diag[bi] = m[:, -1]
        rest = self.rest_diagonal(params)
        for i, p in enumerate(params):
            if diag[i] is None:
                diag[i] = rest[i].expand(p.shape).clone()
        return [d.to(device=p.device, dtype=p.dtype) for d, p in zip(diag, params)]

    def rest_diagonal(self, params: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Parameters outside linear layers: the mean per-entry second moment of the covered ones (a scalar)."""
        covered = {wi for _, _, wi, _ in self.blocks} | {bi for *_, bi in self.blocks if bi is not None}
        moments = [m for m in self.moment if m is not None]
        mean = (sum(float(m.sum()) for m in moments) / max(1, sum(m.numel() for m in moments))) / max(self.n, 1)
        return {i: torch.tensor(mean, dtype=torch.float64) for i in range(len(params)) if i not in covered}


def _add(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if acc is None else acc + x


def _gradient_statistics(engine: InfluenceEngine, idx: list[int], config: PreconditionerConfig,
                         eigenbasis: list[_Block] | None) -> _Stats:
    """One pass of per-sample gradients over ``idx`` with layer hooks (sampled targets when the Task allows)."""
    blocks = _linear_blocks(engine.model, engine.params)
    stats = _Stats(blocks, eigenbasis)
    task = engine.loss_fn if isinstance(engine.loss_fn, Task) else None
    gen = torch.Generator().manual_seed(config.seed + 7)
    handles = stats.hooks()
    bar = tqdm(total=len(idx), desc="curvature statistics", leave=False, dynamic_ncols=True,
               disable=(None if config.progress is None else not config.progress))
    try:
        with engine.inference_mode():
            for start in range(0, len(idx), config.batch_size):
                chunk = idx[start: start + config.batch_size]
                batch = engine.collate([engine.train_set[i] for i in chunk])
                stats.scale = float(len(chunk))
                losses = _statistics_losses(engine, task, batch, gen, config,
                                            f"training samples {chunk[0]}–{chunk[-1]}")
                for d, loss in enumerate(losses):  # the hooks collect what they need
                    torch.autograd.grad(loss, engine.params, allow_unused=True, retain_graph=d < len(losses) - 1)
                    stats.n += len(chunk)
                stats.end_batch()
                bar.update(len(chunk))
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return stats


def _statistics_losses(engine: InfluenceEngine, task: Task | None, batch: Any, gen: torch.Generator,
                       config: PreconditionerConfig, where: str) -> list[torch.Tensor]:
    """``mc_samples`` losses on drawn targets sharing one forward, or the training loss when targets cannot be
    drawn (a plain loss_fn, or a Task without ``sample_targets``)."""
    if task is not None and config.sampled_labels:
        outputs = task.outputs(engine.model, batch)
        try:
            return [task.loss_from_outputs(outputs, task.sample_targets(outputs.detach(), batch, gen))
                    for _ in range(config.mc_samples)]
        except NotImplementedError:
            pass
    return [engine.loss(batch, where)]
