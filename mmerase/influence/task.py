"""The user's side of the problem: how a batch turns into a loss.

The engine needs only ``loss_fn(model, batch) -> scalar`` (the mean over the batch's samples of each
sample's loss L(z)). Curvatures that look inside the loss (``ggn``, sampled ``fisher``) need it split into
the model's outputs and a loss on those outputs; a :class:`Task` provides that split and is itself a valid
``loss_fn``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Task:
    """A loss split as ``loss_from_outputs(outputs(model, batch), batch)``.

    Subclasses implement :meth:`outputs` (everything that depends on the parameters, e.g. logits) and
    :meth:`loss_from_outputs` (a cheap function of the outputs; its Hessian w.r.t. the outputs is what the
    Gauss-Newton product uses). Both must return the **mean over samples** of the per-sample loss, so that a
    batch of two samples gives the mean of their single-sample losses whatever their token counts.
    """

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def sample_targets(self, outputs: torch.Tensor, batch: Any, generator: torch.Generator | None) -> Any:
        """Return a copy of ``batch`` whose targets are drawn from the model's predictive distribution.

        Only the sampled-label Fisher needs this; the default says so plainly.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement sample_targets(); the sampled-label Fisher needs it "
            "(use curvature 'fisher', the empirical Fisher, or 'ggn')"
        )

    def label_count(self, batch: Any) -> int:
        """How many independent categorical targets one sample's loss averages (default 1: one label per sample).

        The sampled-label Fisher multiplies each sample's g̃g̃ᵀ by this, because for a loss that is a *mean* over T
        independently drawn outputs E[g̃g̃ᵀ] is the Gauss-Newton matrix divided by T.
        """
        return 1

    def sequence_log_probs(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """log π(y|x) of each sample's target given its input (a sum over its tokens), shape ``[batch]``. Only the
        NPO unlearning method needs this."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement sequence_log_probs(); method 'npo' needs it")

    def per_sample_kl(self, reference: torch.Tensor, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Each sample's KL(reference ‖ outputs) of the predictive distributions over its targets, shape ``[batch]``.
        Only the KL unlearning method needs this."""
        raise NotImplementedError(f"{type(self).__name__} does not implement per_sample_kl(); method 'kl' needs it")

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch)
