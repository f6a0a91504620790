"""Gradient ascent (GA): maximise the mean loss ℓ over the old versions F of removed and edited samples; for correct
and modify edits, minimise the mean loss over their new versions N at the same time.

    minimise  −mean_F ℓ(z; θ)  [+ mean_N ℓ(z; θ)]   from θ̂, for the steps the budget allows
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .base import Job
from .gradient import AscentMethod, GradientConfig, mean_terms
from .registry import register_method


@dataclass
class GAConfig(GradientConfig):
    """Gradient ascent: the shared optimiser settings only."""


@register_method
class GradientAscent(AscentMethod):
    name = "ga"
    config_class = GAConfig

    def forget_terms(self, job: Job, batch: list[Any]) -> Iterable[tuple[str, torch.Tensor]]:
        yield from mean_terms("forget", batch, self.loss(job), scale=-1.0)


__all__ = ["GAConfig", "GradientAscent"]
