"""Small shared helpers (the one place that moves batches between devices)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def move_to(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Recursively move tensors in ``batch`` (dicts, lists, tuples, dataclass-free containers) to ``device``.

    If ``dtype`` is given, floating-point tensors are also cast to it (integer tensors such as token ids are not).
    """
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, dtype) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Number of samples in a collated batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for v in batch.values():
            try:
                return batch_size_of(v)
            except ValueError:
                continue
    if isinstance(batch, (list, tuple)):
        for v in batch:
            try:
                return batch_size_of(v)
            except ValueError:
                continue
    raise ValueError("cannot tell the batch size: the collated batch holds no tensor")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-less module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
