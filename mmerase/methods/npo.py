"""Negative preference optimisation (NPO; Zhang et al., 2024, "Negative Preference Optimization: From Catastrophic
Collapse to Effective Unlearning"): a bounded forget loss against the adapter before the request, θ̂.

    minimise  (2/β) · mean_F log(1 + (π_θ(y|x) / π_θ̂(y|x))^β)  [+ w · mean_R ℓ]  [+ mean_N ℓ]

π(y|x) is the probability of the whole response (the product over its tokens, :meth:`Task.sequence_log_probs`).
Unlike gradient ascent the loss is bounded below by 0 and its gradient vanishes as π_θ(y|x) → 0, which is what
keeps the model from collapsing. The reference log-probabilities log π_θ̂(y|x) are computed once, before the first
step (one forward per forgotten sample, in eval mode). ``--npo-retain`` adds the retained samples' loss (weight w =
``--retain-weight``); the new versions of corrected or modified samples are learned as in every ascent method.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..influence.distributed import all_reduce_, shard, world
from ..influence.task import Task
from ..options import option
from .base import Job, MethodError
from .gradient import AscentMethod, EditSets, GradientConfig, check_weight, mean_terms
from .graddiff import RETAIN_HELP
from .registry import register_method


@dataclass
class NPOConfig(GradientConfig):
    """NPO: its inverse temperature β and the retain variant."""

    beta: float = option(0.1, help="NPO's β: (2/β)·log(1 + (π_θ/π_θ̂)^β); as β → 0 the loss tends to gradient ascent's")
    npo_retain: bool = option(False, help="NPO with the retain loss: add --retain-weight × the retained samples' loss")
    retain_weight: float = option(1.0, help=RETAIN_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.beta > 0):
            raise ValueError(f"beta must be > 0, got {self.beta}")
        check_weight("retain_weight", self.retain_weight)


def npo_loss(log_probs: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """(2/β) · mean log(1 + exp(β (log π_θ − log π_θ̂))), computed stably as a softplus."""
    return (2.0 / beta) * F.softplus(beta * (log_probs - reference)).mean()


def task_of(job: Job, method: str) -> Task:
    """The engine's loss as a :class:`Task` (the methods that look at the outputs need one)."""
    task = job.engine.loss_fn
    if not isinstance(task, Task):
        raise MethodError(f"method '{method}' needs the loss split into outputs and a loss on them: pass a "
                          "mmerase.influence.Task as the engine's loss_fn (the model bundles provide one)")
    return task


@torch.no_grad()
def reference_log_probs(job: Job, samples: list[Any], batch_size: int) -> torch.Tensor:
    """log π(y|x) of each sample at the current parameters (eval mode), float64 on the CPU; under
    torch.distributed each process computes its share and the results are summed."""
    engine, task = job.engine, task_of(job, "npo")
    out = torch.zeros(len(samples), dtype=torch.float64)
    rank, size = world()
    with engine.inference_mode():
        for start in range(0, len(samples), batch_size):
            for local, live in shard(range(start, min(start + batch_size, len(samples))), rank, size):
                batch = engine.collate([samples[i] for i in local])
                lp = task.sequence_log_probs(task.outputs(engine.model, batch), batch).double().cpu()
                if live:
                    out[list(local)] = lp
    return all_reduce_([out])[0]


@register_method
class NPO(AscentMethod):
    name = "npo"
    config_class = NPOConfig

    def uses_retain(self, job: Job) -> bool:
        return bool(job.config.npo_retain)

    def upfront_passes(self, job: Job, sets: EditSets) -> float:
        return len(sets.forget) / 3  # one forward per forgotten sample

    def prepare(self, job: Job, sets: EditSets) -> None:
        ref = reference_log_probs(job, sets.forget, job.config.batch_size)
        self.reference = {id(s): r for s, r in zip(sets.forget, ref.tolist())}

    def forget_terms(self, job: Job, batch: list[Any]) -> Iterable[tuple[str, torch.Tensor]]:
        engine, task, beta = job.engine, task_of(job, self.name), job.config.beta

        def loss(part: list[Any]) -> torch.Tensor:
            b = engine.collate(part)
            log_probs = task.sequence_log_probs(task.outputs(engine.model, b), b)
            ref = torch.tensor([self.reference[id(s)] for s in part], dtype=log_probs.dtype, device=log_probs.device)
            return npo_loss(log_probs, ref, beta)

        yield from mean_terms("npo", batch, loss)

    def retain_terms(self, job: Job, batch: list[Any]) -> Iterable[tuple[str, torch.Tensor]]:
        yield from mean_terms("retain", batch, self.loss(job), scale=job.config.retain_weight)


__all__ = ["NPO", "NPOConfig", "npo_loss", "reference_log_probs", "task_of"]
