"""Membership-inference scores of one sample's answer under one adapter, their ROC AUC (forget vs held-out samples),
and the forget-quality test against the retrained adapter.

Every score is oriented so that **higher means "looks like a training member"**, and the AUC is that of members
(the forget split, label 1) against non-members (held-out samples, label 0): 0.5 = no membership signal. After
unlearning, the target is the retrained adapter's AUC on the same samples (not 0.5: held-out and forget samples may
differ in difficulty). The answer's tokens are those its loss L(z) averages over; ``logp_t = log p(x_t | x_<t)``.

- ``loss``: ``−L(z) = mean_t logp_t`` (Yeom et al., 2018).
- ``min_k`` (Min-K% Prob; Shi et al., "Detecting Pretraining Data from Large Language Models", ICLR 2024): the mean
  of the ``n = max(1, int(k·T))`` lowest ``logp_t`` among the answer's T tokens (k = 0.2 by default).
- ``min_k_pp`` (Min-K%++; Zhang et al., "Min-K%++: Improved Baseline for Detecting Pre-Training Data from Large
  Language Models", 2024): per token ``z_t = (logp_t − μ_t) / σ_t`` with ``μ_t = Σ_v p(v|x_<t) log p(v|x_<t)`` and
  ``σ_t² = Σ_v p(v|x_<t) (log p(v|x_<t) − μ_t)²`` over the vocabulary under the model's own next-token
  distribution; the score is the mean of the ``n`` lowest ``z_t`` (``z_t = 0`` where ``σ_t = 0``).
- ``zlib`` (Carlini et al., "Extracting Training Data from Large Language Models", USENIX Security 2021):
  ``−L(z) / zlib(answer)``, with ``zlib(answer)`` = the length in bytes of ``zlib.compress`` of the answer's UTF-8
  text (default level).

Forget quality (TOFU; Maini et al., 2024, with per-sample answer losses in place of truth ratios): the p-value of the
two-sample Kolmogorov–Smirnov test (``scipy.stats.ks_2samp``, two-sided, default method) between the adapter's and
the retrained adapter's per-sample losses L(z) on the forget split; high = indistinguishable from retraining.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import UserError
from .io import shown

SCORES = ("loss", "min_k", "min_k_pp", "zlib")


def lowest_k_mean(values: Sequence[float], k: float) -> float:
    """Mean of the ``max(1, int(k·T))`` lowest of the T values."""
    if not values:
        raise ValueError("no token values")
    n = max(1, int(k * len(values)))
    return sum(sorted(values)[:n]) / n


def min_k_score(logprobs: Sequence[float], k: float = 0.2) -> float:
    """Min-K% Prob: the mean of the lowest k% token log-probabilities (see the module docstring)."""
    return lowest_k_mean(logprobs, k)


def min_k_pp_score(logprobs: Sequence[float], means: Sequence[float], stds: Sequence[float], k: float = 0.2) -> float:
    """Min-K%++: the mean of the lowest k% standardised token log-probabilities (see the module docstring)."""
    if not len(logprobs) == len(means) == len(stds):
        raise ValueError("logprobs, means and stds differ in length")
    z = [(lp - m) / s if s > 0 else 0.0 for lp, m, s in zip(logprobs, means, stds)]
    return lowest_k_mean(z, k)


def zlib_bytes(text: str) -> int:
    """Length of the zlib-compressed UTF-8 text (bytes)."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(loss: float, text: str) -> float:
    """``−loss / zlib_bytes(text)``: the loss normalised by the text's zlib entropy, member-high."""
    return -loss / zlib_bytes(text)


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float | None:
    """ROC AUC of member-high scores, members = label 1; None if a group is empty."""
    if not member_scores or not nonmember_scores:
        return None
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, [float(x) for x in (*member_scores, *nonmember_scores)]))


def forget_quality(losses: Sequence[float], retrained_losses: Sequence[float]) -> dict[str, float] | None:
    """Two-sample KS test of per-sample forget-set losses against the retrained adapter's: statistic and p-value."""
    if not losses or not retrained_losses:
        return None
    from scipy.stats import ks_2samp

    res = ks_2samp([float(x) for x in losses], [float(x) for x in retrained_losses])
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue)}


def check_token_fields(rec: Mapping[str, Any], where: str) -> None:
    """Token statistics of a record, when present, must be equal-length lists of finite numbers (stds ≥ 0)."""
    fields = [f for f in ("token_logprobs", "token_vocab_mean", "token_vocab_std") if rec.get(f) is not None]
    lengths = set()
    for f in fields:
        v = rec[f]
        if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        and math.isfinite(x) for x in v):
            raise UserError(f"{where}: {shown(f)} must be a non-empty list of finite numbers")
        lengths.add(len(v))
    if len(lengths) > 1:
        raise UserError(f"{where}: token_logprobs, token_vocab_mean and token_vocab_std differ in length")
    if rec.get("token_vocab_std") is not None and min(rec["token_vocab_std"]) < 0:
        raise UserError(f"{where}: 'token_vocab_std' must be ≥ 0")


def sample_mia_scores(rec: Mapping[str, Any], k: float = 0.2) -> dict[str, float | None]:
    """The member-high scores of one record (None where the record lacks what a score needs)."""
    loss, lps = rec.get("loss"), rec.get("token_logprobs")
    means, stds, text = rec.get("token_vocab_mean"), rec.get("token_vocab_std"), rec.get("reference")
    return {
        "loss": -float(loss) if loss is not None else None,
        "min_k": min_k_score(lps, k) if lps is not None else None,
        "min_k_pp": min_k_pp_score(lps, means, stds, k) if lps is not None and means is not None
        and stds is not None else None,
        "zlib": zlib_score(float(loss), text) if loss is not None and text is not None else None,
    }
