"""The edits file: one JSON object per line, turned into engine :class:`Edit` objects.

    {"op": "remove", "id": "17"}
    {"op": "modify", "id": "17", "image": "fixed/17.png", "query": "<image>\\nWhat is shown?"}
    {"op": "correct", "id": "17", "response": "seven"}
    {"op": "add", "sample": {"id": "new-1", "image": "...", "conversations": [...]}}

Paths in an edit resolve against the edits file's folder. Every problem is a :class:`DataError` naming the file,
line and field.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import DataError, Sample, index_by_id, modify_sample, sample_from_record
from .fileio import jsonl_lines
from .influence import Edit

OPS: dict[str, tuple[set[str], set[str]]] = {  # op -> (required fields, optional fields)
    "remove": ({"id"}, set()),
    "modify": ({"id"}, {"query", "image"}),
    "correct": ({"id", "response"}, set()),
    "add": ({"sample"}, set()),
}


@dataclass
class EditRequest:
    """One parsed line: the raw record (for run records), where it came from, and the engine edit."""

    record: dict[str, Any]
    line: int
    edit: Edit


def parse_edits(path: str | Path, train: Sequence[Sample]) -> list[EditRequest]:
    """Read and validate an edits file against the training samples (ids must exist; each id edited once)."""
    path = Path(path)
    try:
        lines = jsonl_lines(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: edits file not found") from None
    index = index_by_id(train)
    requests: list[EditRequest] = []
    touched: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        op = rec.get("op")
        if op not in OPS:
            close = difflib.get_close_matches(str(op), OPS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DataError(f"{where}: field 'op' is {op!r}{hint}; expected one of: {', '.join(OPS)}")
        required, optional = OPS[op]
        missing = sorted(required - rec.keys())
        if missing:
            raise DataError(f"{where}: '{op}' edit is missing field '{missing[0]}'")
        extra = sorted(rec.keys() - required - optional - {"op"})
        if extra:
            raise DataError(f"{where}: '{op}' edit has unknown field '{extra[0]}' (allowed: "
                            f"{', '.join(sorted(required | optional))})")
        if op == "add":
            new = sample_from_record(rec["sample"], path.parent, source=str(path), label=f"line {lineno}: 'sample'")
            if new.id in index or new.id in touched:
                raise DataError(f"{where}: 'add' sample id '{new.id}' already exists in the training data")
            touched[new.id] = lineno
            requests.append(EditRequest(rec, lineno, Edit(old=None, new=new)))
            continue
        sid = str(rec["id"])
        if sid not in index:
            raise DataError(f"{where}: no sample with id '{sid}' in the training data ({len(index)} samples)")
        if sid in touched:
            raise DataError(f"{where}: sample '{sid}' is already edited on line {touched[sid]}; "
                            "combine both changes into one edit")
        touched[sid] = lineno
        old = index[sid]
        if op == "remove":
            edit = Edit(old=old, new=None)
        elif op == "correct":
            edit = Edit(old=old, new=_modify(old, where, response=rec["response"]))
        else:
            if "query" not in rec and "image" not in rec:
                raise DataError(f"{where}: 'modify' edit needs 'query', 'image' or both")
            edit = Edit(old=old, new=_modify(old, where, query=rec.get("query"), image=rec.get("image"),
                                             root=path.parent))
        requests.append(EditRequest(rec, lineno, edit))
    if not requests:
        raise DataError(f"{path}: the edits file has no edits")
    return requests


def _modify(old: Sample, where: str, **changes: Any) -> Sample:
    for key in ("query", "response", "image"):
        value = changes.get(key)
        if value is not None and not isinstance(value, str) and not (  # a multi-image sample takes a list
                key == "image" and isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise DataError(f"{where}: field '{key}' must be a string" + (" or a list of strings" if key == "image"
                                                                          else ""))
    try:
        return modify_sample(old, **changes)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def edited_dataset(train: Sequence[Sample], edits: Sequence[Edit]) -> list[Sample]:
    """The training set with the edits applied (what a retrain-from-scratch baseline trains on)."""
    replace = {e.old.id: e.new for e in edits if e.old is not None}
    out = [replace.get(s.id, s) for s in train]
    return [s for s in out if s is not None] + [e.new for e in edits if e.old is None]
