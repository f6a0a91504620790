"""KL minimisation: gradient ascent on the old versions F while keeping the model's next-token distributions on the
retained samples R close to those of the adapter before the request, θ̂.

    minimise  −mean_F ℓ(z; θ) + w · mean_R KL(π_θ̂(·|x) ‖ π_θ(·|x))  [+ mean_N ℓ(z; θ)],   w = --retain-weight

A sample's KL is the mean over its response positions of the KL between the two next-token distributions
(:meth:`Task.per_sample_kl`), the same per-sample averaging as ℓ. θ̂'s distributions are recomputed at every step
(one extra forward per retained sample, in eval mode, with θ̂'s parameters swapped in), so nothing the size of the
vocabulary is stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..options import option
from .base import Job
from .gradient import AscentMethod, EditSets, GradientConfig, check_weight, mean_terms
from .graddiff import RETAIN_HELP
from .npo import task_of
from .registry import register_method


@dataclass
class KLConfig(GradientConfig):
    """KL minimisation: the KL term's weight."""

    retain_weight: float = option(1.0, help=RETAIN_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("retain_weight", self.retain_weight)


@register_method
class KLMinimisation(AscentMethod):
    name = "kl"
    config_class = KLConfig

    def uses_retain(self, job: Job) -> bool:
        return True

    def retain_cost(self) -> float:
        return 1.0 + 1.0 / 3.0  # forward and backward at θ, and a forward at θ̂

    def prepare(self, job: Job, sets: EditSets) -> None:
        self.theta_hat = [p.detach().clone() for p in job.engine.params]

    @contextlib.contextmanager
    def at_reference(self, job: Job) -> Iterator[None]:
        """The model at θ̂ in eval mode without gradients, then back to the current parameters and mode."""
        engine = job.engine
        current = [p.detach().clone() for p in engine.params]
        engine.set_parameters(self.theta_hat)
        try:
            with torch.no_grad(), engine.inference_mode():
                yield
        finally:
            engine.set_parameters(current)

    def forget_terms(self, job: Job, batch: list[Any]) -> Iterable[tuple[str, torch.Tensor]]:
        yield from mean_terms("forget", batch, self.loss(job), scale=-1.0)

    def retain_terms(self, job: Job, batch: list[Any]) -> Iterable[tuple[str, torch.Tensor]]:
        engine, task = job.engine, task_of(job, self.name)

        def kl(part: list[Any]) -> torch.Tensor:
            b = engine.collate(part)
            with self.at_reference(job):
                reference = task.outputs(engine.model, b)
            return task.per_sample_kl(reference, task.outputs(engine.model, b), b).mean()

        yield from mean_terms("kl", batch, kl, scale=job.config.retain_weight)


__all__ = ["KLConfig", "KLMinimisation"]
