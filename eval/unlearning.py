"""Unlearning metrics over per-sample results of several adapters (e.g. base, corrupted, retrained, unlearned).

Pure functions over records; whatever loads a model and computes per-sample losses/generations plugs in by producing,
per adapter, a list of dicts::

    {"id": "17", "split": "forget", "loss": 2.31,            # mean token cross-entropy of the sample (nats)
     "prediction": "seven", "reference": "7",                 # optional: generated and reference answers
     "correct": false}                                        # optional: overrides the exact-match accuracy

and calling :func:`evaluate_unlearning`. Optional per-token fields (answer tokens, in order) feed the token-level
membership scores, and ``kl_retrained`` the distance to retraining::

    {"token_logprobs": [...],      # log p(x_t | x_<t) of each answer token
     "token_vocab_mean": [...],    # μ_t: mean of log p over the vocabulary under the model's next-token distribution
     "token_vocab_std": [...],     # σ_t: its standard deviation (see mmerase.eval.mia)
     "kl_retrained": 0.012}        # KL(retrained ‖ this adapter) averaged over the answer tokens (nats)

Per split: mean loss, accuracy (``correct`` if given, else normalised exact match of prediction and reference) and
ROUGE-L F-measure, as fractions in [0, 1]. Recovery ratio per split and metric: ``(adapter - corrupted) / (retrained
- corrupted)`` (1 = as good as retraining, 0 = no change). Membership inference: ROC AUC of each score of
:mod:`mmerase.eval.mia` (loss, Min-K%, Min-K%++, zlib) separating the forget split (members) from held-out samples (0.5 = no
signal; the retrained adapter's AUC is the target). Distance to retraining, per split: the mean over samples of
``kl_retrained``, where for one sample ``KL = (1/T) Σ_t Σ_v P_r(v|x_<t) [log P_r(v|x_<t) − log P_a(v|x_<t)]`` over
its T answer tokens, with P_r the retrained and P_a this adapter's next-token distribution on the same prefix
(teacher-forced reference answer). Forget quality: the KS-test p-value of :func:`mmerase.eval.mia.forget_quality`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmerase.metrics import recovery_ratio

from .errors import UserError
from .io import shown, shown_some
from .mia import SCORES, auc, check_token_fields, forget_quality, sample_mia_scores

SPLIT_METRICS = ("loss", "accuracy", "rouge_l")

_TOKEN = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """Tokens as the ``rouge_score`` package makes them (no stemming): lower-case, split on non-alphanumerics."""
    return [t for t in _TOKEN.split(text.lower()) if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: LCS-based precision P = lcs/|pred|, recall R = lcs/|ref|, F = 2PR/(P+R); 0 when empty."""
    p, r = rouge_tokenize(prediction), rouge_tokenize(reference)
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop surrounding whitespace and trailing ``.``/``!``."""
    return " ".join(text.lower().split()).rstrip(".!").strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def membership_auc(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float | None:
    """ROC AUC of the score ``-loss`` for members (label 1) vs. non-members (label 0); None if a group is empty."""
    return auc([-float(x) for x in member_losses], [-float(x) for x in nonmember_losses])


# --------------------------------------------------------------------------------------------------- per-sample data
def _check_records(name: str, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    seen: set[tuple[str, str]] = set()
    for k, rec in enumerate(records, start=1):
        where = f"adapter {shown(name)}, record {k}"
        if not isinstance(rec, Mapping):
            raise UserError(f"{where}: not an object")
        if "id" not in rec or not isinstance(rec.get("split"), str):
            raise UserError(f"{where}: needs 'id' and 'split'")
        key = (rec["split"], str(rec["id"]))
        if key in seen:
            raise UserError(f"{where}: duplicate sample {shown(key[1])} in split {shown(key[0])}")
        seen.add(key)
        r = dict(rec)
        r["id"] = str(rec["id"])
        if "loss" in r and r["loss"] is not None:
            if isinstance(r["loss"], bool) or not isinstance(r["loss"], (int, float)) or not math.isfinite(r["loss"]):
                raise UserError(f"{where} ({shown(key[1])}): 'loss' must be a finite number, got {shown(r['loss'])}")
        for f in ("prediction", "reference"):
            if f in r and r[f] is not None and not isinstance(r[f], str):
                raise UserError(f"{where} ({shown(key[1])}): {shown(f)} must be text")
        if "correct" in r and r["correct"] is not None and not isinstance(r["correct"], bool):
            raise UserError(f"{where} ({shown(key[1])}): 'correct' must be true or false")
        check_token_fields(r, f"{where} ({shown(key[1])})")
        kl = r.get("kl_retrained")
        if kl is not None and (isinstance(kl, bool) or not isinstance(kl, (int, float)) or not math.isfinite(kl)
                               or kl < -1e-9):
            raise UserError(f"{where} ({shown(key[1])}): 'kl_retrained' must be a finite number ≥ 0, got {shown(kl)}")
        out.append(r)
    return out


def sample_scores(rec: Mapping[str, Any], min_k: float | None = None) -> dict[str, Any]:
    """Per-sample accuracy and ROUGE-L, and with ``min_k`` the membership scores of :mod:`mmerase.eval.mia` and the KL to
    retraining (None where the record lacks what they need)."""
    pred, ref = rec.get("prediction"), rec.get("reference")
    correct = rec.get("correct")
    if correct is None and pred is not None and ref is not None:
        correct = exact_match(pred, ref)
    out = {
        "loss": rec.get("loss"),
        "correct": correct,
        "rouge_l": rouge_l(pred, ref) if pred is not None and ref is not None else None,
    }
    if min_k is not None:
        out.update({f"mia_{k}": v for k, v in sample_mia_scores(rec, min_k).items() if k != "loss"})
        out["kl_retrained"] = rec.get("kl_retrained")
    return out


def split_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean loss, accuracy and ROUGE-L of one split's records; a metric only some records support is an error."""
    scored = [sample_scores(r) for r in records]
    out: dict[str, Any] = {"n": len(records)}
    for metric, field in (("loss", "loss"), ("accuracy", "correct"), ("rouge_l", "rouge_l")):
        vals = [s[field] for s in scored]
        have = [v for v in vals if v is not None]
        if have and len(have) != len(vals):
            ids = [r["id"] for r, v in zip(records, vals) if v is None][:3]
            raise UserError(f"{len(vals) - len(have)} record(s) lack what {shown(metric)} needs while others have it, "
                            f"e.g. {shown_some(ids)}")
        out[metric] = (sum(float(v) for v in have) / len(have)) if have else None
    return out


def evaluate_unlearning(
    records_by_adapter: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    corrupted: str | None = None,
    retrained: str | None = None,
    mia_member_split: str = "forget",
    mia_nonmember_split: str = "test",
    min_k: float = 0.2,
) -> dict[str, Any]:
    """Per-adapter split metrics, recovery ratios against (corrupted, retrained), membership-inference AUCs, KL to
    the retrained adapter per split and the forget-quality KS test (see the module docstring).

    Every adapter must cover the same samples (split, id) so the numbers compare like with like.
    """
    if not records_by_adapter:
        raise UserError("no adapters to evaluate")
    if not 0 < min_k <= 1:
        raise UserError(f"--min-k must be in (0, 1], got {min_k}")
    for role, name in (("corrupted", corrupted), ("retrained", retrained)):
        if name is not None and name not in records_by_adapter:
            raise UserError(f"--{role} {shown(name)} is not one of the adapters: {shown_some(sorted(records_by_adapter), 10)}")
    if corrupted is not None and retrained is None:
        raise UserError("--corrupted needs --retrained: the recovery ratio is measured between both")
    data = {name: _check_records(name, recs) for name, recs in records_by_adapter.items()}
    keysets = {name: {(r["split"], r["id"]) for r in recs} for name, recs in data.items()}
    first = next(iter(keysets))
    for name, ks in keysets.items():
        if ks != keysets[first]:
            diff = sorted(ks ^ keysets[first])[:3]
            raise UserError(f"adapters {shown(first)} and {shown(name)} cover different samples, e.g. {shown_some(diff)}")
    splits = list(dict.fromkeys(r["split"] for r in data[first]))
    adapters: dict[str, Any] = {}
    for name, recs in data.items():
        per_split = {s: split_metrics([r for r in recs if r["split"] == s]) for s in splits}
        mia = mia_aucs(recs, mia_member_split, mia_nonmember_split, min_k)
        adapters[name] = {"splits": per_split, "mia_auc": mia["loss"], "mia": mia,
                          "kl_retrained": {s: _mean_field([r for r in recs if r["split"] == s], "kl_retrained")
                                           for s in splits}}
    for name in data:
        adapters[name]["forget_quality"] = None if retrained is None else forget_quality(
            _losses(data[name], mia_member_split), _losses(data[retrained], mia_member_split))
    recovery: dict[str, Any] = {}
    if corrupted is not None and retrained is not None:
        for name in data:
            if name in (corrupted, retrained):
                continue
            recovery[name] = {
                s: {m: recovery_ratio(adapters[name]["splits"][s][m], adapters[corrupted]["splits"][s][m],
                                      adapters[retrained]["splits"][s][m]) for m in SPLIT_METRICS}
                for s in splits
            }
    return {
        "splits": splits,
        "adapters": adapters,
        "recovery": recovery,
        "reference": {"corrupted": corrupted, "retrained": retrained},
        "mia": {"member_split": mia_member_split, "nonmember_split": mia_nonmember_split, "min_k": min_k,
                "scores": list(SCORES), "score": "-loss", "note": "0.5 = no membership signal; the retrained "
                "adapter's AUC is the target"},
        "forget_quality": {"split": mia_member_split, "test": "two-sample Kolmogorov-Smirnov (scipy.stats.ks_2samp) "
                           "of per-sample losses against the retrained adapter's"},
    }


def _losses(recs: Sequence[Mapping[str, Any]], split: str) -> list[float]:
    return [float(r["loss"]) for r in recs if r["split"] == split and r.get("loss") is not None]


def _mean_field(recs: Sequence[Mapping[str, Any]], field: str) -> float | None:
    vals = [r.get(field) for r in recs]
    have = [float(v) for v in vals if v is not None]
    if have and len(have) != len(vals):
        raise UserError(f"{len(vals) - len(have)} record(s) lack {shown(field)} while others have it, e.g. "
                        f"{shown_some([r['id'] for r, v in zip(recs, vals) if v is None])}")
    return sum(have) / len(have) if have else None


def mia_aucs(recs: Sequence[Mapping[str, Any]], member_split: str, nonmember_split: str, min_k: float = 0.2
             ) -> dict[str, float | None]:
    """ROC AUC of each membership score (:mod:`mmerase.eval.mia`), members = ``member_split``, non-members =
    ``nonmember_split``; None for a score that some of these records cannot give (e.g. no token statistics, or no
    reference text for zlib)."""
    scored = {s: [sample_mia_scores(r, min_k) for r in recs if r["split"] == s] for s in (member_split, nonmember_split)}
    out: dict[str, float | None] = {}
    for kind in SCORES:
        vals = {s: [sc[kind] for sc in rows] for s, rows in scored.items()}
        usable = all(v is not None for rows in vals.values() for v in rows)
        out[kind] = auc(vals[member_split], vals[nonmember_split]) if usable else None
    return out


def render_markdown(result: Mapping[str, Any], places: int = 4) -> str:
    """One table: a row per adapter and split with loss/accuracy/ROUGE-L, recovery ratios, and the MIA AUC."""
    from .report import markdown_table

    rows = []
    for name, a in result["adapters"].items():
        for s in result["splits"]:
            m = a["splits"][s]
            rec = result["recovery"].get(name, {}).get(s, {})
            rows.append([name, s, m["n"], m["loss"], m["accuracy"], m["rouge_l"],
                         rec.get("loss"), rec.get("accuracy"), rec.get("rouge_l"),
                         a["mia_auc"] if s == result["mia"]["member_split"] else None])
    ref = result["reference"]
    head = "# Unlearning evaluation\n\n"
    if ref["corrupted"]:
        head += (f"Recovery = (adapter − {ref['corrupted']}) / ({ref['retrained']} − {ref['corrupted']}); "
                 "1 = matches retraining.\n")
    head += (f"MIA AUC: ROC AUC of −loss, members = split '{result['mia']['member_split']}', non-members = split "
             f"'{result['mia']['nonmember_split']}'; 0.5 = no membership signal.\n\n")
    return head + markdown_table(
        ["adapter", "split", "n", "loss", "accuracy", "ROUGE-L", "recovery (loss)", "recovery (acc)",
         "recovery (ROUGE-L)", "MIA AUC"], rows, places)
