"""Per-sample records for :mod:`mmerase.eval.unlearning` computed from models: mmerase's base + each adapter on each split.

For every sample: its loss L(z) (the model bundle's own per-sample loss), the greedy answer and the reference (its
last assistant turn), and per answer token (the tokens L(z) averages over, teacher-forced on the reference):
``log p(x_t | x_<t)``, and the mean μ_t and standard deviation σ_t of ``log p(v | x_<t)`` over the vocabulary under
the model's own next-token distribution (Min-K%++). With a retrained adapter named, also ``kl_retrained``:
``(1/T) Σ_t KL(P_retrained(·|x_<t) ‖ P_adapter(·|x_<t))`` over the sample's T answer tokens. Token statistics and
the KL are computed in float64 from the model's logits.

The KL needs two adapters' distributions on the same batch: the retrained adapter's model is loaded once and each
other adapter is added to it as a second peft adapter (one base in memory), switched per batch.

Imports torch and mmerase: only the ``unlearning --base/--adapters/--splits`` path loads this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100


def answer_positions(labels: torch.Tensor) -> list[torch.Tensor]:
    """For each row of a batch, the positions t whose logits predict an answer token (label at t+1 is not -100)."""
    target = labels[:, 1:]
    return [torch.nonzero(row != IGNORE_INDEX).flatten() for row in target]


def _answer_logprobs(logits: torch.Tensor, pos: torch.Tensor, i: int) -> torch.Tensor:
    """log-softmax in float64 of sample ``i``'s logits at its answer positions, ``[T, vocab]``."""
    return torch.log_softmax(logits[i, pos].double(), dim=-1)


def token_statistics(logits: torch.Tensor, labels: torch.Tensor) -> list[dict[str, list[float]]]:
    """Per sample: ``token_logprobs`` (log p of each answer token), ``token_vocab_mean`` (μ_t) and ``token_vocab_std``
    (σ_t) of log p over the vocabulary under the next-token distribution p, float64."""
    labels = labels.to(logits.device)
    out = []
    for i, pos in enumerate(answer_positions(labels)):
        if pos.numel() == 0:
            raise ValueError("a sample has no answer tokens to score (all labels are -100)")
        lp = _answer_logprobs(logits, pos, i)
        tok = lp.gather(1, labels[i, pos + 1].unsqueeze(1)).squeeze(1)
        p = lp.exp()
        mu = (p * lp).sum(-1)
        sigma = (p * (lp - mu.unsqueeze(1)) ** 2).sum(-1).sqrt()
        out.append({"token_logprobs": tok.tolist(), "token_vocab_mean": mu.tolist(),
                    "token_vocab_std": sigma.tolist()})
    return out


def kl_per_sample(ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per sample: the mean over its answer tokens of KL(P_ref ‖ P) between the two models' next-token
    distributions, float64 (nats)."""
    out = []
    for i, pos in enumerate(answer_positions(labels.to(logits.device))):
        lr, lq = _answer_logprobs(ref_logits, pos, i), _answer_logprobs(logits, pos, i)
        out.append(float((lr.exp() * (lr - lq)).sum(-1).mean()))
    return out


@torch.no_grad()
def _logits(bundle: Any, samples: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = bundle.collate(samples)
    return bundle.loss_fn.outputs(bundle.model, batch), batch["labels"]


def adapter_records(bundle: Any, split: str, samples: Sequence[Any], *, batch_size: int = 8, generate: bool = True,
                    max_new_tokens: int = 32, progress: bool | None = None) -> list[dict[str, Any]]:
    """Records of one split under the loaded adapter: id, split, loss, prediction, reference and token statistics."""
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        losses = bundle.per_sample_losses(samples, batch_size=batch_size).tolist()
        stats: list[dict[str, list[float]]] = []
        for chunk in bundle.batches(samples, batch_size):
            stats += token_statistics(*_logits(bundle, chunk))
    finally:
        bundle.model.train(was_training)
    answers = bundle.generate(samples, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress) \
        if generate else [None] * len(samples)
    return [{"id": s.id, "split": split, "loss": loss, "prediction": a, "reference": s.response, **st}
            for s, loss, a, st in zip(samples, losses, answers, stats)]


def kl_to_reference(ref_bundle: Any, adapter: str | Path | None, data: Mapping[str, Sequence[Any]], *,
                    batch_size: int = 8) -> dict[tuple[str, str], float]:
    """``{(split, id): KL(reference ‖ adapter)}``: ``adapter`` (a peft folder, or None for the base alone) is added
    to the reference bundle's model beside its own adapter and both are run on each batch."""
    model = ref_bundle.model
    own = model.active_adapter
    extra = "mmerase-eval-other"
    if adapter is not None:
        model.load_adapter(str(adapter), adapter_name=extra)
    was_training = model.training
    model.eval()
    out: dict[tuple[str, str], float] = {}
    try:
        for split, samples in data.items():
            for chunk in ref_bundle.batches(samples, batch_size):
                model.set_adapter(own)
                ref_logits, labels = _logits(ref_bundle, chunk)
                if adapter is None:
                    with model.disable_adapter():
                        logits, _ = _logits(ref_bundle, chunk)
                else:
                    model.set_adapter(extra)
                    logits, _ = _logits(ref_bundle, chunk)
                for s, kl in zip(chunk, kl_per_sample(ref_logits, logits, labels)):
                    out[(split, s.id)] = kl
    finally:
        model.set_adapter(own)
        if adapter is not None:
            model.delete_adapter(extra)
        model.train(was_training)
    return out


def score_models(base: str, adapters: Mapping[str, str | Path | None], splits: Mapping[str, str | Path], *,
                 options: Any, retrained: str | None = None, generate: bool = True, batch_size: int = 8,
                 max_new_tokens: int = 32, progress: bool | None = None) -> dict[str, list[dict[str, Any]]]:
    """``{adapter name: records}`` for :func:`mmerase.eval.unlearning.evaluate_unlearning` (see the module docstring)."""
    from mmerase.data import load_dataset
    from mmerase.models import load_model

    data = {split: load_dataset(path) for split, path in splits.items()}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, adapter in adapters.items():
        bundle = load_model(base, adapter=adapter, options=options)
        out[name] = [r for split, samples in data.items() for r in adapter_records(
            bundle, split, samples, batch_size=batch_size, generate=generate, max_new_tokens=max_new_tokens,
            progress=progress)]
        del bundle
    if retrained is not None:
        ref = load_model(base, adapter=adapters[retrained], options=options)
        for name, adapter in adapters.items():
            kls = {key: 0.0 for key in ((r["split"], r["id"]) for r in out[name])} if name == retrained else \
                kl_to_reference(ref, adapter, data, batch_size=batch_size)
            for r in out[name]:
                r["kl_retrained"] = kls[(r["split"], r["id"])]
    return out
