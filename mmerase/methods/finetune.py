"""Fine-tuning on the edited training set, continued from the adapter before the request θ̂.

    minimise  mean ℓ over the edited training set R ∪ N ∪ A   (removed samples dropped, edited ones replaced by
              their new versions N, added ones A appended: what a retraining trains on)

with the edited samples (N ∪ A) optionally up-weighted by ``--edited-weight`` u: a batch B costs
(Σ_{B∖E} ℓ + u Σ_{B∩E} ℓ) / |B|. The batches are the fine-tune's own (reshuffled passes over the edited set, seeded
by the method seed) through the same training loop, so started from the LoRA initialisation with the retraining's
recipe (:meth:`GradientConfig.from_train_config`) and a budget of epochs × |edited set| sample passes it is that
retraining, bit for bit. Serves every edit op.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..options import option
from .base import Job, MethodError
from .gradient import EditSets, GradientConfig, GradientMethod, Stream, check_weight, mean_terms
from .registry import register_method


@dataclass
class FinetuneConfig(GradientConfig):
    """Fine-tuning on the edited data: the edited samples' weight."""

    edited_weight: float = option(1.0, help=(
        "weight of the edited samples (new versions and added samples) in the fine-tune's loss (1: the plain "
        "edited training set)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("edited_weight", self.edited_weight)


@register_method
class Finetune(GradientMethod):
    name = "finetune"
    config_class = FinetuneConfig

    def streams(self, job: Job, sets: EditSets) -> list[Stream]:
        if not sets.edited:
            raise MethodError("method 'finetune': the edits remove every training sample, nothing is left to train on")
        self.edited_ids = {id(s) for s in sets.new + sets.added}
        return [self.stream(job, "train", sets.edited, 0)]

    def terms(self, job: Job, batches: dict[str, list[Any]]) -> Iterable[tuple[str, torch.Tensor]]:
        batch, weight, loss = batches["train"], job.config.edited_weight, self.loss(job)
        if weight == 1.0:
            yield from mean_terms("loss", batch, loss)
            return
        edited = [s for s in batch if id(s) in self.edited_ids]
        rest = [s for s in batch if id(s) not in self.edited_ids]
        if rest:
            yield from mean_terms("retained", rest, loss, scale=len(rest) / len(batch))
        if edited:
            yield from mean_terms("edited", edited, loss, scale=weight * len(edited) / len(batch))


__all__ = ["Finetune", "FinetuneConfig"]
