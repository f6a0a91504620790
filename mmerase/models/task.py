"""The loss every model family trains and unlearns with: the per-sample mean over assistant tokens.

:class:`CausalLMTask` is the :class:`~mmerase.influence.task.Task` a :class:`~mmerase.models.base.ModelBundle` hands
to the influence engine: ``outputs`` are the logits, ``loss_from_outputs`` the mean over samples of each sample's mean
response-token cross-entropy (see docs/design.md for why samples, not tokens, are weighed equally).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmerase.influence.task import Task
from mmerase.utils import model_device, move_to

IGNORE_INDEX = -100

#: batch keys every family passes to the model; image families add theirs (see :class:`CausalLMTask`)
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _response_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits predicting each next token, upcast from half precision; the next tokens; where they are response
    tokens). Refuses a sample without response tokens."""
    logits = logits[:, :-1]
    target = labels[:, 1:].to(logits.device)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    mask = target != IGNORE_INDEX
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("a sample in the batch has no response tokens to score (all labels are -100)")
    return logits, target, mask


def _token_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(target.shape)


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's L(z): the mean cross-entropy over its response tokens (labels != -100), shape ``[batch]``.

    Logits at position t predict the label at t+1. Half-precision logits are upcast to float32 for the loss.
    """
    logits, target, mask = _response_targets(logits, labels)
    nll = _token_nll(logits, target)
    return nll.sum(dim=1) / mask.sum(dim=1).to(nll.dtype)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's log π(y|x): the sum of its response tokens' log-probabilities, shape ``[batch]``."""
    logits, target, _ = _response_targets(logits, labels)
    return -_token_nll(logits, target).sum(dim=1)


def per_sample_kl(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean over its response positions of KL(softmax(reference) ‖ softmax(logits)), shape
    ``[batch]``: how far the next-token distributions moved from the reference's where the answer is predicted."""
    logits, _, mask = _response_targets(logits, labels)
    ref = reference[:, :-1].to(logits.dtype)
    log_q = torch.log_softmax(logits, dim=-1)
    log_p = torch.log_softmax(ref, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum(dim=1) / m.sum(dim=1)


class CausalLMTask(Task):
    """The loss for every family: ``outputs`` = logits, ``loss_from_outputs`` = mean over samples of L(z).

    The batch loss is the **mean over samples of each sample's mean response-token cross-entropy**, not the mean
    over all response tokens pooled across the batch: a batch of a 2-token and a 10-token answer weighs both samples
    equally, so R(θ) = (1/n) Σ L(z_i) whatever the batching.

    ``input_keys`` are the batch entries given to the model (token ids, masks, and an image family's pixel values,
    image sizes or grids); ``pixel_keys`` among them are floating-point image tensors cast to ``pixel_dtype``.
    """

    def __init__(self, pixel_dtype: torch.dtype | None = None, input_keys: Sequence[str] = TEXT_INPUTS + (
            "pixel_values",), pixel_keys: Sequence[str] = ("pixel_values",)) -> None:
        self.pixel_dtype = pixel_dtype
        self.input_keys = tuple(input_keys)
        self.pixel_keys = tuple(pixel_keys)

    def model_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = move_to(batch, model_device(model))
        inputs = {k: batch[k] for k in self.input_keys if batch.get(k) is not None}
        if self.pixel_dtype is not None:
            for k in self.pixel_keys:
                if k in inputs:
                    inputs[k] = inputs[k].to(self.pixel_dtype)
        return inputs

    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**self.model_inputs(model, batch), use_cache=False).logits

    def loss_from_outputs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return per_sample_losses(outputs, batch["labels"]).mean()

    def per_sample_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L(z) for each sample of ``batch``, shape ``[batch]``."""
        return per_sample_losses(self.outputs(model, batch), batch["labels"])

    def sequence_log_probs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log π(y|x) of each sample's response (sum over its tokens), shape ``[batch]``."""
        return sequence_log_probs(outputs, batch["labels"])

    def per_sample_kl(self, reference: torch.Tensor, outputs: torch.Tensor, batch: dict[str, torch.Tensor]
                      ) -> torch.Tensor:
        """Each sample's mean response-position KL(reference ‖ outputs) of the next-token distributions."""
        return per_sample_kl(reference, outputs, batch["labels"])

    def label_count(self, batch: dict[str, torch.Tensor]) -> int:
        """The response tokens of a one-sample batch: the independent targets its mean loss averages (see
        :meth:`Task.label_count`)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def sample_targets(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor],
                       generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Copy of ``batch`` whose response tokens are drawn from the model's softmax (sampled-label Fisher).

        Draws run on the CPU with ``generator`` (reproducible on any device), then move to the labels' device.
        """
        labels = batch["labels"]
        logits = outputs[:, :-1].detach().float()
        probs = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
        draws = torch.multinomial(probs.cpu(), 1, generator=generator).view(logits.shape[:2]).to(labels.device)
        new = labels.clone()
        mask = labels[:, 1:] != IGNORE_INDEX
        new[:, 1:] = torch.where(mask, draws, labels[:, 1:])
        return {**batch, "labels": new}


__all__ = ["CausalLMTask", "IGNORE_INDEX", "TEXT_INPUTS", "per_sample_kl", "per_sample_losses", "sequence_log_probs"]
