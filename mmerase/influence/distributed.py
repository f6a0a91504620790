"""Data-parallel products under torch.distributed: sharding in lockstep, one flat all-reduce, and what a sharded
(DeepSpeed ZeRO-3) or fused-attention model cannot compute.

Every rank holds the model and the same solver state. A chunk of samples is split across ranks (rank r takes
``chunk[r::world]``), each rank's partial product is weighted by its share of the samples, and the sum is
all-reduced, so a product does not depend on the number of processes beyond float rounding. Ranks must run the
same number of forward/backward passes in the same order: DeepSpeed ZeRO-3 gathers each layer's weights with a
collective inside every forward and backward, so a rank that skipped a pass would hang the others. A rank whose
share of a chunk is short therefore runs zero-weight passes on padding samples (:func:`shard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import InfluenceError

#: attention implementations whose backward is itself differentiable (exact Hessian products need that)
DOUBLE_BACKWARD_ATTENTION = ("eager", "mmerase_eager")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(chunk: Sequence[int], rank: int, world_size: int, per_sample: bool = False,
          ) -> list[tuple[list[int], bool]]:
    """This rank's passes over ``chunk``: ``[(positions, live), ...]``; a pass with ``live=False`` is padding whose
    result the caller must drop (weight 0).

    Rank r's live part is ``chunk[r::world]``. With ``per_sample=False`` (a backend that runs one set of passes per
    batch, whatever its size) a rank with no live sample runs one padding pass on ``chunk[:1]``; with
    ``per_sample=True`` (passes per sample, e.g. the Fisher) a rank with fewer samples than the longest share pads up
    to it. On one process this is just ``[(chunk, True)]``.
    """
    chunk = list(chunk)
    local = chunk[rank::world_size]
    passes = [(local, True)] if local else []
    if world_size == 1 or not chunk:
        return passes
    if per_sample:
        missing = len(chunk[0::world_size]) - len(local)
        if missing > 0:
            passes.append((chunk[:missing], False))
    elif not local:
        passes.append((chunk[:1], False))
    return passes


def all_reduce_(vec: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum ``vec`` over all ranks in place, as one flat buffer per (dtype, device) (one collective, not hundreds)."""
    if world()[1] == 1:
        return vec
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(vec):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for idx in groups.values():
        flat = torch.cat([vec[i].reshape(-1) for i in idx])
        torch.distributed.all_reduce(flat)
        offset = 0
        for i in idx:
            n = vec[i].numel()
            vec[i].copy_(flat[offset: offset + n].view_as(vec[i]))
            offset += n
    return vec


def is_zero3(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the model's parameters (they carry ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _attention_implementations(model: nn.Module) -> set[str]:
    """The ``_attn_implementation`` of a transformers model's config and its sub-configs (empty for other models)."""
    found: set[str] = set()
    stack = [getattr(model, "config", None)]
    inner = getattr(model, "module", None)  # a DeepSpeed engine wraps the model
    if isinstance(inner, nn.Module):
        stack.append(getattr(inner, "config", None))
    while stack:
        cfg = stack.pop()
        if cfg is None:
            continue
        impl = getattr(cfg, "_attn_implementation", None)
        if isinstance(impl, str):
            found.add(impl)
        stack += [getattr(cfg, k, None) for k in ("text_config", "vision_config")]
    return found


def check_product_support(model: nn.Module, curvature: Any) -> None:
    """Raise :class:`InfluenceError` when ``curvature`` needs a second backward the model cannot give.

    Two cases: DeepSpeed ZeRO-3 (it frees each layer's gathered weights after their backward, so the double
    backward finds an empty weight: ``mat2 must be a matrix``), and fused attention kernels (SDPA, flash) that have
    no double backward.
    """
    if not getattr(curvature, "needs_second_order", False):
        return
    name = getattr(curvature, "name", str(curvature))
    what = f"curvature '{name}'" + (" with ggn_jvp='autograd'" if name == "ggn" else "")
    if is_zero3(model):
        raise InfluenceError(
            f"{what} needs a second backward through the base weights, but DeepSpeed ZeRO-3 frees each layer's "
            "gathered weights after their first backward (the double backward then fails with 'mat2 must be a "
            "matrix'). Under ZeRO-3 use a first-order curvature: 'fd-hessian', 'ggn' with ggn_jvp='fd', or "
            "'fisher'; or drop ZeRO-3 and run plain data-parallel (torchrun, the full base on every rank) for "
            "exact 'hessian' products.")
    fused = sorted(_attention_implementations(model) - set(DOUBLE_BACKWARD_ATTENTION))
    if fused:
        raise InfluenceError(
            f"{what} needs a double backward through attention, but the model uses attn_implementation="
            f"{fused[0]!r}, whose kernel has none. Load the model with attn_implementation='eager' "
            "(mmerase's LoadOptions(exact_hvp=True), the default, does so), or use a first-order curvature: "
            "'fd-hessian', 'ggn' with ggn_jvp='fd', or 'fisher'.")


__all__ = ["DOUBLE_BACKWARD_ATTENTION", "all_reduce_", "check_product_support", "is_zero3", "shard", "world"]
