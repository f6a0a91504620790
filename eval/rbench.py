"""R-Bench (relation hallucination) and other POPE-style yes/no benchmarks: answer parsing and metrics.

Default ``official`` mode reproduces R-Bench's ``eval.py`` (POPE's rule): keep the text before the first ``.``,
remove commas, split on spaces; the answer is "no" if a word is exactly ``No``, ``not`` or ``no``, otherwise "yes"
(so an off-topic or empty answer counts as "yes"). Precision/recall/F1 use the official ``+1e-5`` in the
denominators; the averaged row is the mean over the id subsets (R-Bench ships five) of the x100 metrics.
A subset id list is iterated as given, duplicates included, as the official script does (duplicates are reported).

``strict`` mode (named deviation) reads the same first sentence case-insensitively and only accepts a clear answer:
"yes" when the words contain ``yes`` and neither ``no`` nor ``not``, "no" for ``no``/``not`` without ``yes``;
anything else is *unparseable*, reported per subset and left out of the metrics instead of being counted as "yes".

In both modes a question without a prediction is reported (count and ids), never silently dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import read_json, read_json_or_jsonl, shown, shown_some

MODES = ("official", "strict")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _first_sentence(text: str) -> str:
    return text.split(".")[0] if "." in text else text


def parse_official(text: str) -> int:
    """POPE/R-Bench rule: 0 ("no") if the first sentence has the word ``No``, ``not`` or ``no``, else 1 ("yes")."""
    words = _first_sentence(text).replace(",", "").split(" ")
    return 0 if ("No" in words or "not" in words or "no" in words) else 1


_WORD = re.compile(r"[a-z]+")


def parse_strict(text: str) -> int | None:
    """1 for a clear yes, 0 for a clear no (``no``/``not``), None when the first sentence has neither or both."""
    words = set(_WORD.findall(_first_sentence(text).replace(",", "").lower()))
    yes, no = "yes" in words, bool(words & {"no", "not"})
    if yes and not no:
        return 1
    if no and not yes:
        return 0
    return None


def parse_label(value: Any, where: str) -> int:
    """Ground-truth label ``yes``/``no`` (any case, optional final period) as 1/0."""
    if isinstance(value, str):
        v = value.strip().lower().rstrip(".")
        if v in ("yes", "no"):
            return 1 if v == "yes" else 0
    raise UserError(f"{where}: label must be 'yes' or 'no', got {shown(value)}")


def yes_no_metrics(preds: Sequence[int], labels: Sequence[int], eps: float = 1e-5) -> dict[str, Any]:
    """Confusion counts and accuracy/precision/recall/F1/yes-ratio in percent ("yes" is the positive class).

    ``eps`` is the official script's denominator guard (0 gives the textbook ratios, NaN-free: 0/0 reads as 0).
    Returns None-valued metrics for an empty list.
    """
    if len(preds) != len(labels):
        raise ValueError("preds and labels differ in length")
    tp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 0)
    tn = sum(1 for p, y in zip(preds, labels) if p == 0 and y == 0)
    fn = sum(1 for p, y in zip(preds, labels) if p == 0 and y == 1)
    n = len(preds)
    counts = {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "positives": tp + fn, "negatives": tn + fp}
    if n == 0:
        return {**counts, **{m: None for m in METRICS}}

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    precision = ratio(tp, tp + fp + eps)
    recall = ratio(tp, tp + fn + eps)
    f1 = ratio(2 * precision * recall, precision + recall + eps)
    return {
        **counts,
        "accuracy": 100.0 * (tp + tn) / n,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n,
    }


# ----------------------------------------------------------------------------------------------------------- inputs
def load_questions(path: str | Path, label_field: str = "label") -> dict[str, dict[str, Any]]:
    """Question file (JSON list or JSONL) -> ``{str(question_id): record}`` in file order; every record needs
    ``question_id``, ``text`` and a yes/no ``label_field``."""
    data, _ = read_json_or_jsonl(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list (or JSON Lines) of questions")
    out: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(data, start=1):
        where = f"{path}: question {i}"
        if not isinstance(rec, dict) or "question_id" not in rec:
            raise UserError(f"{where}: needs a 'question_id'")
        qid = str(rec["question_id"])
        if qid in out:
            raise UserError(f"{where}: duplicate question_id {shown(qid)}")
        if label_field not in rec:
            raise UserError(f"{where}: no {shown(label_field)} field (the yes/no ground truth)")
        parse_label(rec[label_field], f"{where} ({shown(qid)})")
        out[qid] = rec
    if not out:
        raise UserError(f"{path}: no questions")
    return out


def load_answer_records(path: str | Path) -> list[tuple[Any, str]]:
    """Predictions ``{"question_id", "text"}`` (JSON Lines, a JSON list, or an ``{id: text}`` object) ->
    ``[(question_id as written, text), ...]`` in file order."""
    data, _ = read_json_or_jsonl(path)
    if isinstance(data, dict) and "question_id" in data:
        data = [data]
    if isinstance(data, dict):  # {id: text} layout
        if not all(isinstance(v, str) for v in data.values()):
            raise UserError(f"{path}: expected {{question_id: text}} or records with question_id and text")
        return list(data.items())
    if not isinstance(data, list):
        raise UserError(f"{path}: expected JSON Lines of {{\"question_id\", \"text\"}}")
    out: list[tuple[Any, str]] = []
    for i, rec in enumerate(data, start=1):
        if not isinstance(rec, dict) or "question_id" not in rec or not isinstance(rec.get("text"), str):
            raise UserError(f"{path}: answer {i} needs 'question_id' and a text 'text'")
        out.append((rec["question_id"], rec["text"]))
    return out


def load_answers(path: str | Path) -> tuple[dict[str, str], int]:
    """Predictions -> ``({str(question_id): text}, number of duplicate ids)``; see :func:`answers_by_id`."""
    return answers_by_id(load_answer_records(path))


def answers_by_id(records: Sequence[tuple[Any, str]]) -> tuple[dict[str, str], int]:
    """``[(question_id, text)]`` -> ``({str(question_id): text}, number of duplicate ids)``; the last answer of a
    duplicated id wins, as in the official script."""
    out: dict[str, str] = {}
    dups = 0
    for raw, text in records:
        qid = str(raw)
        dups += qid in out
        out[qid] = text
    return out, dups


def ids_matched_by_conversion(questions: Mapping[str, Mapping[str, Any]], raw_ids: Sequence[Any]) -> list[str]:
    """Answer ids that name a question only after conversion between number and text (``"7"`` for ``7``).

    Ids are matched as text here; R-Bench's own script compares them as written, so it counts these answers as
    missing. The caller reports how many there were.
    """
    out = []
    for raw in raw_ids:
        q = questions.get(str(raw))
        if q is not None and (type(q["question_id"]) is not type(raw) or q["question_id"] != raw):
            out.append(str(raw))
    return list(dict.fromkeys(out))


def load_subset_ids(path: str | Path) -> list[str]:
    """One R-Bench id subset file: a JSON list of question ids (kept as given, duplicates included)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of question ids")
    return [str(x) for x in data]


#: the web-image set's two question types, reported first and in this order as R-Bench's script prints them
WEB_TYPES = ("counterfactual", "illusion")


def type_subsets(questions: Mapping[str, Mapping[str, Any]], path: str | Path = "questions") -> dict[str, list[str]]:
    """Web-image mode: one subset per value of the questions' ``type`` field (``counterfactual`` and ``illusion``
    first, other values in order of appearance), then ``total`` = every question, as R-Bench's ``--eval_web``."""
    by_type: dict[str, list[str]] = {}
    for qid, q in questions.items():
        t = q.get("type")
        if not isinstance(t, str) or not t:
            raise UserError(f"{path}: question {shown(qid)} has no text 'type' field (web-image mode takes its subsets "
                            "from it, e.g. 'counterfactual' or 'illusion')")
        by_type.setdefault(t, []).append(qid)
    if "total" in by_type:
        raise UserError(f"{path}: a question 'type' is named 'total', the name of the all-questions row")
    order = [t for t in WEB_TYPES if t in by_type] + [t for t in by_type if t not in WEB_TYPES]
    return {**{t: by_type[t] for t in order}, "total": list(questions)}


# ------------------------------------------------------------------------------------------------------- evaluation
def evaluate_subset(
    questions: Mapping[str, Mapping[str, Any]],
    answers: Mapping[str, str],
    ids: Sequence[str],
    mode: str = "official",
    label_field: str = "label",
    name: str = "subset",
) -> dict[str, Any]:
    """Metrics of one id subset plus what was left out: ``missing`` (no prediction) and, in strict mode,
    ``unparseable`` ids."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    unknown = sorted({i for i in ids if i not in questions})
    if unknown:
        raise UserError(f"{name}: {len(unknown)} id(s) are not in the question file, e.g. {shown_some(unknown)}")
    preds: list[int] = []
    labels: list[int] = []
    missing: list[str] = []
    unparseable: list[str] = []
    for qid in ids:
        if qid not in answers:
            missing.append(qid)
            continue
        p = parse_official(answers[qid]) if mode == "official" else parse_strict(answers[qid])
        if p is None:
            unparseable.append(qid)
            continue
        preds.append(p)
        labels.append(parse_label(questions[qid][label_field], qid))
    dup = sum(c - 1 for c in Counter(ids).values() if c > 1)
    return {
        "questions": len(ids),
        "duplicate_ids": dup,
        "scored": len(preds),
        "missing": len(missing),
        "missing_ids": missing,
        "unparseable": len(unparseable),
        "unparseable_ids": unparseable,
        "metrics": yes_no_metrics(preds, labels),
    }


def evaluate(
    questions: Mapping[str, Mapping[str, Any]],
    answers: Mapping[str, str],
    subsets: Mapping[str, Sequence[str]] | None = None,
    mode: str = "official",
    label_field: str = "label",
) -> dict[str, Any]:
    """Per-subset results and their average (mean of each x100 metric over subsets that scored anything)."""
    if not subsets:
        subsets = {"all": list(questions)}
    per = {name: evaluate_subset(questions, answers, ids, mode, label_field, name) for name, ids in subsets.items()}
    average: dict[str, float | None] = {}
    for m in METRICS:
        vals = [r["metrics"][m] for r in per.values() if r["metrics"][m] is not None]
        average[m] = sum(vals) / len(vals) if vals else None
    return {
        "mode": mode,
        "subsets": per,
        "average": average,
        "missing_total": len({i for r in per.values() for i in r["missing_ids"]}),
        "unparseable_total": len({i for r in per.values() for i in r["unparseable_ids"]}),
    }


def per_question_rows(
    questions: Mapping[str, Mapping[str, Any]],
    answers: Mapping[str, str],
    subsets: Mapping[str, Sequence[str]],
    label_field: str = "label",
) -> list[dict[str, Any]]:
    """One row per question: its prediction, both parses, correctness under each, and its subsets."""
    member: dict[str, list[str]] = {}
    for name, ids in subsets.items():
        for i in dict.fromkeys(ids):
            member.setdefault(i, []).append(name)
    rows = []
    for qid, q in questions.items():
        label = parse_label(q[label_field], qid)
        text = answers.get(qid)
        off = parse_official(text) if text is not None else None
        st = parse_strict(text) if text is not None else None
        rows.append({
            "question_id": q["question_id"], "label": "yes" if label else "no", "text": text,
            "official": None if off is None else ("yes" if off else "no"),
            "strict": None if st is None else ("yes" if st else "no"),
            "correct_official": None if off is None else off == label,
            "correct_strict": None if st is None else st == label,
            "subsets": member.get(qid, []),
        })
    return rows
