"""R-Bench's instance-level box mode (its script's ``--eval_box``): did the model name the boxed object?

Inputs as R-Bench's script takes them: a question file (JSON Lines, or a JSON list) whose records carry a ``label``
list, the first element of which is the name expected in the answer, and the model's answers (JSON Lines with
``text``). An answer is correct when the label's first element, lower-cased, occurs in the answer text as written
(a substring test: case-sensitive on the answer, no first-sentence cut, negations not read, so "not a man" names
"man" and an empty answer names nothing). Accuracy = correct / scored answers, in percent.

Answers are paired with questions by ``question_id`` when every question and every answer has one (ids compared as
text; those that only match after conversion between number and text are counted), and otherwise by position,
as R-Bench's script always does; for files written in question order the two agree. Questions without an answer
are reported, never scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import read_json_or_jsonl, shown


def _records(path: str | Path, what: str) -> list[dict[str, Any]]:
    data, _ = read_json_or_jsonl(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected JSON Lines (or a JSON list) of {what}")
    for i, rec in enumerate(data, start=1):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: {what[:-1]} {i} is not an object")
    return data


def load_box_questions(path: str | Path) -> list[dict[str, Any]]:
    """Box-mode questions; each needs a ``label`` list whose first element is text (the expected name)."""
    data = _records(path, "questions")
    for i, rec in enumerate(data, start=1):
        label = rec.get("label")
        if not isinstance(label, list) or not label or not isinstance(label[0], str):
            raise UserError(f"{path}: question {i} ({shown(rec.get('question_id', 'no id'))}): box mode needs 'label' as a "
                            f"list whose first element is the object's name, got {shown(label)}")
    return data


def load_box_answers(path: str | Path) -> list[dict[str, Any]]:
    """Box-mode answers; each needs a text ``text``."""
    data = _records(path, "answers")
    for i, rec in enumerate(data, start=1):
        if not isinstance(rec.get("text"), str):
            raise UserError(f"{path}: answer {i} needs a text 'text'")
    return data


def box_correct(text: str, label: Sequence[str]) -> bool:
    """R-Bench's rule: the label's first element, lower-cased, is a substring of the answer as written."""
    return label[0].lower() in text


def _pair(questions: list[dict[str, Any]], answers: list[dict[str, Any]], answers_path: str | Path
          ) -> tuple[str, list[tuple[int, dict[str, Any]]], list[str], int]:
    """``(pairing, [(question index, answer)], ignored answer ids, ids matched only after conversion)``."""
    if all("question_id" in q for q in questions) and all("question_id" in a for a in answers):
        index: dict[str, int] = {}
        for k, q in enumerate(questions):
            if str(q["question_id"]) in index:
                raise UserError(f"box questions: duplicate question_id {shown(q['question_id'])}")
            index[str(q["question_id"])] = k
        pairs, ignored, converted, seen = [], [], 0, set()
        for a in answers:
            k = index.get(str(a["question_id"]))
            if k is None:
                ignored.append(str(a["question_id"]))
                continue
            if k in seen:
                raise UserError(f"{answers_path}: two answers for question_id {shown(a['question_id'])}")
            seen.add(k)
            qid = questions[k]["question_id"]
            converted += type(qid) is not type(a["question_id"]) or qid != a["question_id"]
            pairs.append((k, a))
        return "question_id", pairs, ignored, converted
    if len(answers) > len(questions):
        raise UserError(f"{answers_path}: {len(answers)} answers for {len(questions)} questions; without a "
                        "question_id on every record, answers are paired with questions by position")
    return "position", list(enumerate(answers)), [], 0


def evaluate_box(questions: list[dict[str, Any]], answers: list[dict[str, Any]],
                 answers_path: str | Path = "answers") -> dict[str, Any]:
    """Box-mode accuracy (percent) with what was left out; per-question rows under ``rows``."""
    pairing, pairs, ignored, converted = _pair(questions, answers, answers_path)
    answered = {k for k, _ in pairs}
    rows = []
    for k, a in pairs:
        q = questions[k]
        rows.append({"question_id": q.get("question_id", k), "label": q["label"][0], "text": a["text"],
                     "correct": box_correct(a["text"], q["label"])})
    correct = sum(r["correct"] for r in rows)
    missing = [str(q.get("question_id", k)) for k, q in enumerate(questions) if k not in answered]
    return {
        "eval": "box",
        "pairing": pairing,
        "questions": len(questions),
        "scored": len(rows),
        "correct": correct,
        "accuracy": 100.0 * correct / len(rows) if rows else None,
        "missing": len(missing),
        "missing_ids": missing,
        "ignored_answers": len(ignored),
        "ids_matched_by_conversion": converted,
        "rows": rows,
    }
