"""The edits file: one JSON object per line, turned into engine :class:`Edit` objects.

    {"op": "remove", "id": "17"}
    {"op": "modify", "id": "17", "image": "fixed/17.png", "query": "<image>\\nWhat is shown?"}
    {"op": "correct", "id": "17", "response": "seven"}
    {"op": "add", "sample": {"id": "new-1", "image": "...", "conversations": [...]}}

Paths in an edit resolve against the edits file's folder and must lie (symlinks resolved) inside it or inside the
training data's folder unless the caller allows others: an edit is the user's request, and a path such as
``../../secret.png`` or ``/etc/...`` in it is far more likely a mistake (or an attack) than the intent. Every image
an edit points at is recorded (the path as given, where it resolved, its sha256) for the run record. Every problem
is a :class:`DataError` naming the file, line and field; values from the file are echoed bounded and escaped.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DataError, Sample, index_by_id, modify_sample, sample_from_record
from .fileio import FileFormatError, JSONContentError, jsonl_lines, parse_json, read_text, sha256_file, shown
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
    images: list[dict[str, str]] = field(default_factory=list)


def parse_edits(path: str | Path, train: Sequence[Sample], *, image_roots: Sequence[str | Path] = (),
                outside_images: bool = False) -> list[EditRequest]:
    """Read and validate an edits file against the training samples (ids must exist; each id edited once).

    An edit's images must lie inside the edits file's folder or one of ``image_roots`` (e.g. the training data's
    folder) unless ``outside_images``; each request lists the images it points at (:func:`image_record`)."""
    path = Path(path)
    try:
        lines = jsonl_lines(read_text(path))
    except FileFormatError as e:
        raise DataError(f"edits file {e}") from None
    roots = [path.parent, *map(Path, image_roots)]
    index = index_by_id(train)
    requests: list[EditRequest] = []
    touched: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        requests.append(_parse_line(line, where, lineno, path, index, touched, (roots, outside_images)))
    if not requests:
        raise DataError(f"{path}: the edits file has no edits")
    return requests


def _read_line(line: str, where: str) -> dict[str, Any]:
    try:
        rec = parse_json(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
    except JSONContentError as e:
        raise DataError(f"{where}: {e}") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    op = rec.get("op")
    if op not in OPS:
        close = difflib.get_close_matches(str(op)[:100], OPS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"{where}: field 'op' is {shown(op)}{hint}; expected one of: {', '.join(OPS)}")
    required, optional = OPS[op]
    missing = sorted(required - rec.keys())
    if missing:
        raise DataError(f"{where}: '{op}' edit is missing field '{missing[0]}'")
    extra = sorted(rec.keys() - required - optional - {"op"})
    if extra:
        raise DataError(f"{where}: '{op}' edit has unknown field {shown(extra[0])} (allowed: "
                        f"{', '.join(sorted(required | optional))})")
    return rec


def _parse_line(line: str, where: str, lineno: int, path: Path, index: dict[str, Sample],
                touched: dict[str, int], images: tuple[Sequence[Path], bool]) -> EditRequest:
    """One line of the edits file → its request (``touched``: the ids edited so far, with their lines; ``images``:
    the folders its images may lie in, and whether others are allowed). Image paths are checked before any image
    file is opened."""
    rec = _read_line(line, where)
    op = rec["op"]
    if op == "add":
        label = f"line {lineno}: 'sample'"
        unchecked = sample_from_record(rec["sample"], path.parent, source=str(path), label=label, check_image=False)
        found = [(_checked_image(Path(r), *images, where), None) for r in unchecked.image_refs]
        new = sample_from_record(rec["sample"], path.parent, source=str(path), label=label)
        if new.id in index or new.id in touched:
            raise DataError(f"{where}: 'add' sample id {shown(new.id)} already exists in the training data")
        touched[new.id] = lineno
        return EditRequest(rec, lineno, Edit(old=None, new=new), [image_record(*f) for f in found])
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        raise DataError(f"{where}: field 'id' must be a string or an integer, got {shown(rec['id'])}")
    sid = str(rec["id"])
    if sid not in index:
        raise DataError(f"{where}: no sample with id {shown(sid)} in the training data ({len(index)} samples)")
    if sid in touched:
        raise DataError(f"{where}: sample {shown(sid)} is already edited on line {touched[sid]}; "
                        "combine both changes into one edit")
    touched[sid] = lineno
    old = index[sid]
    given = rec.get("image") if op == "modify" else None
    found = [(_checked_image(path.parent / g, *images, where), g)
             for g in (given if isinstance(given, list) else [given]) if isinstance(g, str)]
    if op == "remove":
        edit = Edit(old=old, new=None)
    elif op == "correct":
        edit = Edit(old=old, new=_modify(old, where, response=rec["response"]))
    else:
        if "query" not in rec and "image" not in rec:
            raise DataError(f"{where}: 'modify' edit needs 'query', 'image' or both")
        edit = Edit(old=old, new=_modify(old, where, query=rec.get("query"), image=rec.get("image"),
                                         root=path.parent))
    return EditRequest(rec, lineno, edit, [image_record(*f) for f in found])


def _checked_image(ref: Path, roots: Sequence[Path], outside: bool, where: str) -> Path:
    """``ref``, refused if it lies outside ``roots`` (symlinks resolved) unless ``outside``; nothing is read."""
    resolved = ref.resolve()
    inside = any(resolved == r.resolve() or r.resolve() in resolved.parents for r in roots)
    if not inside and not outside:
        raise DataError(f"{where}: image {shown(str(ref))} resolves to {shown(str(resolved))}, outside the edits "
                        f"file's folder and the training data's folder; move it there, or pass "
                        "--allow-outside-images to use it on purpose")
    return ref


def image_record(ref: Path, given: str | None = None) -> dict[str, Any]:
    """What a run record keeps of an image an edit points at: the path as the edit gives it (``given``; an added
    sample's paths are kept in its record), as joined to the edits file's folder, where it resolves to (symlinks
    followed) and the sha256 of its bytes."""
    return {"given": given, "path": str(ref), "resolved": str(ref.resolve()), "sha256": sha256_file(ref)}


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
