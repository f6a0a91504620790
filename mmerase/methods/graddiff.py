"""Gradient difference (GradDiff): gradient ascent on the old versions F plus descent on the retained samples R.

    minimise  −mean_F ℓ(z; θ) + w · mean_R ℓ(z; θ)  [+ mean_N ℓ(z; θ)],   w = --retain-weight
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..options import option
from .base import Job
from .gradient import AscentMethod, GradientConfig, check_weight, mean_terms
from .registry import register_method

RETAIN_HELP = "weight w of the retained samples' term"


@dataclass
class GradDiffConfig(GradientConfig):
    """Gradient difference: the retain term's weight."""

    retain_weight: float = option(1.0, help=RETAIN_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("retain_weight", self.retain_weight)


@register_method
class GradientDifference(AscentMethod):
    name = "graddiff"
    config_class = GradDiffConfig

    def uses_retain(self, job: Job) -> bool:
        return True

    def forget_terms(self, job: Job, batch: list[Any]) -> Iterable[tuple[str, torch.Tensor]]:
        yield from mean_terms("forget", batch, self.loss(job), scale=-1.0)

    def retain_terms(self, job: Job, batch: list[Any]) -> Iterable[tuple[str, torch.Tensor]]:
        yield from mean_terms("retain", batch, self.loss(job), scale=job.config.retain_weight)


__all__ = ["GradDiffConfig", "GradientDifference", "RETAIN_HELP"]
