"""Peak memory of a block of work: CUDA's allocator peak on a GPU, the process's peak resident set on a CPU.

Used for the run record's memory report (one training step vs one curvature product vs the whole solve) and by
``benchmarks/gpu_memory.py``. On Linux the CPU peak (``VmHWM``) is reset before each block by writing ``5`` to
``/proc/self/clear_refs``, so each figure is that block's own peak; where that is not possible the figure is the
process's lifetime peak and says so (``"peak_scope": "process"``).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else _rss_peak_bytes()


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.result``: ``{"peak_bytes", "start_bytes", "seconds", "kind",
    "peak_scope"}``.

    On CUDA ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` during the block (tensors, not the allocator's
    cache) and ``start_bytes`` what was allocated when it began (weights, optimizer state); on CPU both are the
    process's resident set (peak during the block, and at its start).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.result: dict[str, Any] = {}

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self._scope = "block"
        else:
            self._scope = "block" if _reset_rss_peak() else "process"
            self._start = _rss_bytes()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            kind = "cuda_allocated"
        else:
            peak = _rss_peak_bytes()
            kind = "cpu_rss"
        self.result = {"kind": kind, "peak_bytes": int(peak), "start_bytes": int(self._start),
                       "seconds": time.perf_counter() - self._t0, "peak_scope": self._scope}


def gib(n_bytes: int | float) -> float:
    """Bytes → GiB, rounded for reports."""
    return round(n_bytes / 2**30, 3)


__all__ = ["PeakMemory", "engine_memory_report", "gib", "product_report", "training_step_report"]


def training_step_report(engine: Any, indices: list[int]) -> dict[str, Any]:
    """Peak memory and time of one training step on training samples ``indices``: a forward and backward in training
    mode (what a fine-tuning step costs without the optimizer's update, which for an adapter is small)."""
    modes = [(m, m.training) for m in engine.model.modules()]
    engine.model.train()
    try:
        with PeakMemory(engine.device) as step:
            loss = engine.loss(engine.collate([engine.train_set[i] for i in indices]), "the memory report's batch")
            torch.autograd.grad(loss, engine.params, allow_unused=True)
            del loss
    finally:
        for m, t in modes:
            m.training = t
    return {"batch_samples": len(indices), "train_step": step.result}


def product_report(engine: Any, plan: Any, indices: list[int], seed: int = 0) -> dict[str, Any]:
    """Peak memory and time of one curvature product (the solve's curvature, split over the ranks as the solve splits
    it) over training samples ``indices``, with a seeded random vector."""
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) for p in engine.params]
    with PeakMemory(engine.device) as product:
        engine.product(v, plan.curvature, indices=indices, batch_size=plan.config.batch_size)
    return product.result


def engine_memory_report(engine: Any, plan: Any, seed: int = 0) -> dict[str, Any]:
    """Peak memory and time of one training step (:func:`training_step_report`) and of one curvature product
    (:func:`product_report`), on the first ``config.batch_size`` training samples, for the run record (the whole
    solve is measured by the caller around ``engine.solve``). Every rank must call this (products are collective).
    """
    idx = list(range(min(plan.config.batch_size, engine.n)))  # plan: a resolved SolvePlan
    return {**training_step_report(engine, idx), "product": product_report(engine, plan, idx, seed)}
