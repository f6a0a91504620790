"""Arithmetic on parameter-shaped vectors (a list of tensors aligned with the trainable parameters)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Vec = list[torch.Tensor]


def zeros_like(vec: Sequence[torch.Tensor]) -> Vec:
    return [torch.zeros_like(t) for t in vec]


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Inner product accumulated in float64 (sums over millions of entries lose digits in float32)."""
    return float(sum((x.detach().double() * y.detach().double()).sum() for x, y in zip(a, b)))


def norm(a: Sequence[torch.Tensor]) -> float:
    return dot(a, a) ** 0.5


def axpy(alpha: float, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vec:
    """Return y + alpha * x."""
    return [yi + alpha * xi for xi, yi in zip(x, y)]


def scale(alpha: float, x: Sequence[torch.Tensor]) -> Vec:
    return [alpha * xi for xi in x]


def add(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vec:
    return [xi + yi for xi, yi in zip(x, y)]


def sub(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vec:
    return [xi - yi for xi, yi in zip(x, y)]


def is_finite(x: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in x)


def flatten(x: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in x])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Vec:
    """Split ``flat`` into tensors shaped like ``like``, each on its tensor's device and in its dtype."""
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].view_as(t).to(device=t.device, dtype=t.dtype))
        i += t.numel()
    return out
