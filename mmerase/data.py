"""Training data in the LLaVA conversation format.

A dataset is a JSON list or a JSONL file of records::

    {"id": "17", "image": "images/17.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat digit is this?"},
                       {"from": "gpt", "value": "seven"}]}

``image`` is optional (text-only samples) and resolves against the dataset file's folder. Every problem is a
:class:`DataError` whose message names the file, the record and the field, so a user can fix the data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"

# LLaVA data uses "human"/"gpt"; chat templates use "user"/"assistant".
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """Bad training or edit data; the message names the file, record and field."""


@dataclass
class Sample:
    """One training sample: a conversation and at most one image.

    ``conversations`` keeps the LLaVA form (``{"from": ..., "value": ...}``). The image is given either as a path
    (``image_path``, already resolved) or as a loaded PIL image (``image``, e.g. an edit's new image); when both are
    set the loaded image wins.
    """

    id: str
    conversations: list[dict[str, str]]
    image_path: Path | None = None
    image: Image.Image | None = field(default=None, repr=False)

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_path is not None

    @property
    def messages(self) -> list[tuple[str, str]]:
        """The conversation as ``(role, text)`` pairs with roles ``user``/``assistant``/``system``."""
        return [(ROLE_ALIASES[turn["from"]], turn["value"]) for turn in self.conversations]

    @property
    def query(self) -> str:
        """Text of the first user turn (the question the image is asked about)."""
        return next(text for role, text in self.messages if role == "user")

    @property
    def response(self) -> str:
        """Text of the last assistant turn."""
        return [text for role, text in self.messages if role == "assistant"][-1]

    def load_image(self) -> Image.Image | None:
        """The sample's image as RGB, or ``None`` for a text-only sample."""
        if self.image is not None:
            return self.image.convert("RGB")
        if self.image_path is None:
            return None
        return _open_image(self.image_path, where=f"sample '{self.id}': field 'image'")

    def to_record(self, root: str | Path | None = None) -> dict[str, Any]:
        """The LLaVA-format record (image path relative to ``root`` when it lies below it).

        A sample whose image exists only in memory cannot be written as a record; save the image first.
        """
        record: dict[str, Any] = {"id": self.id}
        if self.image is not None and self.image_path is None:
            raise DataError(f"sample '{self.id}': its image exists only in memory; save it to a file to write a record")
        if self.image_path is not None:
            path = Path(self.image_path)
            if root is not None:
                try:
                    path = path.resolve().relative_to(Path(root).resolve())
                except ValueError:
                    pass
            record["image"] = path.as_posix()
        record["conversations"] = [dict(turn) for turn in self.conversations]
        return record


def _open_image(path: Path, where: str) -> Image.Image:
    if not Path(path).is_file():
        raise DataError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # Pillow raises several types; the text is what the user needs
        raise DataError(f"{where}: cannot read image {path}: {exc}") from exc


def _check_image_file(path: Path, where: str) -> None:
    """Cheap check that ``path`` is an image Pillow can read (header + integrity, no full decode)."""
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:
        raise DataError(f"{where}: cannot read image {path}: {exc}") from exc


def validate_conversations(conversations: Any, has_image: bool, where: str) -> list[dict[str, str]]:
    """Check a LLaVA ``conversations`` list and return a clean copy; ``where`` prefixes error messages."""
    if conversations is None:
        raise DataError(f"{where}: missing field 'conversations'")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns")
    clean: list[dict[str, str]] = []
    n_placeholders = 0
    for t, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: field 'conversations[{t}]' must be an object with 'from' and 'value'")
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLE_ALIASES:
            raise DataError(
                f"{where}: field 'conversations[{t}].from' is {role!r}; expected one of {sorted(ROLE_ALIASES)}"
            )
        if not isinstance(value, str):
            raise DataError(f"{where}: field 'conversations[{t}].value' must be a string")
        n = value.count(IMAGE_PLACEHOLDER)
        if n and ROLE_ALIASES[role] != "user":
            raise DataError(f"{where}: field 'conversations[{t}].value': the {IMAGE_PLACEHOLDER} placeholder "
                            f"must be in a user turn, not a {role!r} turn")
        n_placeholders += n
        clean.append({"from": role, "value": value})
    if not any(ROLE_ALIASES[turn["from"]] == "assistant" for turn in clean):
        raise DataError(f"{where}: field 'conversations' has no assistant ('gpt') turn to train on")
    if has_image and n_placeholders == 0:
        raise DataError(f"{where}: field 'image' is set but no turn contains the {IMAGE_PLACEHOLDER} placeholder")
    if not has_image and n_placeholders:
        raise DataError(f"{where}: field 'conversations' contains {IMAGE_PLACEHOLDER} but the record has no 'image'")
    if n_placeholders > 1:
        raise DataError(f"{where}: field 'conversations' contains {n_placeholders} {IMAGE_PLACEHOLDER} "
                        "placeholders; one image per sample is supported")
    return clean


def sample_from_record(record: Any, root: str | Path, *, source: str = "<record>", index: int | None = None,
                       label: str | None = None, check_image: bool = True) -> Sample:
    """Validate one LLaVA record and build a :class:`Sample` (image resolved against ``root``).

    Also what an ``add`` edit uses to turn its inline sample into a :class:`Sample`. ``index`` is the record's
    default id; ``label`` says where it is in messages (default ``record <index>``).
    """
    label = label or (f"record {index}" if index is not None else "record")
    if not isinstance(record, Mapping):
        raise DataError(f"{source}: {label}: expected a JSON object, got {type(record).__name__}")
    sid = record.get("id", index)
    if sid is None:
        raise DataError(f"{source}: {label}: missing field 'id'")
    if not isinstance(sid, (str, int)) or isinstance(sid, bool):
        raise DataError(f"{source}: {label}: field 'id' must be a string or an integer")
    sid = str(sid)
    where = f"{source}: {label} (id '{sid}')"
    image = record.get("image")
    image_path = None
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: field 'image' must be a file path (string)")
        image_path = Path(root) / image
        if check_image:
            _check_image_file(image_path, f"{where}: field 'image'")
    conversations = validate_conversations(record.get("conversations"), image_path is not None, where)
    return Sample(id=sid, conversations=conversations, image_path=image_path)


def _read_records(path: Path) -> tuple[list[tuple[int, Any]], bool]:
    """((position, record) pairs, is_jsonl) from a JSON list or a JSONL file; JSONL positions are line numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: dataset file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    data: Any = None
    jsonl = path.suffix.lower() == ".jsonl"
    if not jsonl:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if not (exc.msg == "Extra data" and text.lstrip().startswith("{")):  # else: JSONL named ".json"
                raise DataError(f"{path}: malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
            jsonl = True
    if jsonl:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        return records, True
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or JSONL, one record per line)")
    return list(enumerate(data)), False


def load_dataset(path: str | Path, *, check_images: bool = True) -> list[Sample]:
    """Load and validate a LLaVA-format JSON or JSONL dataset.

    Images resolve against the file's folder; ``check_images`` opens each one (header check, no full decode) so a
    missing or broken file fails here rather than mid-training. Records are numbered by line in JSONL files and by
    position (from 0) in JSON lists; a record without ``id`` gets that number as its id.
    """
    path = Path(path)
    records, jsonl = _read_records(path)
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for pos, record in records:
        label = f"line {pos}" if jsonl else f"record {pos}"
        sample = sample_from_record(record, path.parent, source=str(path), index=pos, label=label,
                                    check_image=check_images)
        if sample.id in seen:
            raise DataError(f"{path}: {label}: duplicate id '{sample.id}' (first used at {seen[sample.id]})")
        seen[sample.id] = label
        samples.append(sample)
    if not samples:
        raise DataError(f"{path}: the dataset has no records")
    return samples


def save_dataset(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples as a JSON list (or JSONL when ``path`` ends in ``.jsonl``), image paths relative to its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [s.to_record(path.parent) for s in samples]
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def index_by_id(samples: Sequence[Sample]) -> dict[str, Sample]:
    """Map id → sample (raises on duplicate ids)."""
    index: dict[str, Sample] = {}
    for s in samples:
        if s.id in index:
            raise DataError(f"duplicate sample id '{s.id}'")
        index[s.id] = s
    return index


def get_sample(samples: Sequence[Sample] | Mapping[str, Sample], sample_id: str | int) -> Sample:
    """The sample with ``sample_id``; a :class:`DataError` naming the id if there is none."""
    index = samples if isinstance(samples, Mapping) else index_by_id(samples)
    try:
        return index[str(sample_id)]
    except KeyError:
        raise DataError(f"no sample with id '{sample_id}' in the training data ({len(index)} samples)") from None


def modify_sample(sample: Sample, *, query: str | None = None, response: str | None = None,
                  image: str | Path | Image.Image | None = None, root: str | Path | None = None,
                  query_turn: int = 0, response_turn: int = -1, new_id: str | None = None) -> Sample:
    """A copy of ``sample`` with a new query text, response text and/or image (the edited z_new of an edit).

    ``query`` replaces the user turn number ``query_turn`` (default: the first), ``response`` the assistant turn
    number ``response_turn`` (default: the last). ``image`` is a path (relative paths resolve against ``root``) or a
    PIL image. The result is validated like a loaded record: e.g. a new query must keep the ``<image>`` placeholder
    when the sample has an image.
    """
    conversations = [dict(turn) for turn in sample.conversations]
    where = f"edit of sample '{sample.id}'"

    def _turn_index(role: str, k: int, what: str) -> int:
        idx = [i for i, t in enumerate(conversations) if ROLE_ALIASES[t["from"]] == role]
        try:
            return idx[k]
        except IndexError:
            raise DataError(f"{where}: field '{what}': the sample has {len(idx)} {role} turn(s), no turn {k}") from None

    if query is not None:
        conversations[_turn_index("user", query_turn, "query")]["value"] = query
    if response is not None:
        conversations[_turn_index("assistant", response_turn, "response")]["value"] = response
    image_path, image_obj = sample.image_path, sample.image
    if isinstance(image, Image.Image):
        image_path, image_obj = None, image.convert("RGB")
    elif image is not None:
        image_path = Path(image) if root is None or Path(image).is_absolute() else Path(root) / image
        image_obj = None
        _check_image_file(image_path, f"{where}: field 'image'")
    has_image = image_path is not None or image_obj is not None
    conversations = validate_conversations(conversations, has_image, where)
    return dataclasses.replace(sample, id=sample.id if new_id is None else str(new_id), conversations=conversations,
                               image_path=image_path, image=image_obj)


# --- real images: scikit-learn's digits -------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_QUESTION = f"{IMAGE_PLACEHOLDER}\nWhat digit is this?"


def digit_images(size: int = 16, n: int | None = None) -> tuple[list[Image.Image], list[int]]:
    """scikit-learn's ``load_digits`` (8×8 grey, values 0–16) as RGB PIL images of ``size``×``size``.

    White strokes on black, upscaled with nearest-neighbour so the pixels stay crisp. Returns (images, labels).
    """
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = digits.images if n is None else digits.images[:n]
    out = []
    for arr in imgs:
        grey = Image.fromarray(np.round(arr * (255.0 / 16.0)).astype(np.uint8), mode="L")
        out.append(grey.resize((size, size), Image.NEAREST).convert("RGB"))
    return out, [int(t) for t in digits.target[: len(out)]]


def digit_samples(indices: Iterable[int] | None = None, size: int = 16, labels: Mapping[int, int] | None = None,
                  prefix: str = "digit-") -> list[Sample]:
    """In-memory samples "<image> What digit is this?" → "seven" for the given digit indices.

    ``labels`` overrides the answer for some indices (e.g. to corrupt a fraction of the answers).
    """
    images, targets = digit_images(size)
    indices = range(len(images)) if indices is None else indices
    labels = labels or {}
    return [Sample(id=f"{prefix}{i}", image=images[i],
                   conversations=[{"from": "human", "value": DIGIT_QUESTION},
                                  {"from": "gpt", "value": DIGIT_WORDS[labels.get(i, targets[i])]}])
            for i in indices]


def write_digits_dataset(out_dir: str | Path, indices: Iterable[int], size: int = 16,
                         labels: Mapping[int, int] | None = None, filename: str = "train.json") -> Path:
    """Write digit samples as PNG files plus a LLaVA-format JSON dataset; returns the dataset path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for s in digit_samples(indices, size=size, labels=labels):
        path = out_dir / "images" / f"{s.id}.png"
        s.image.save(path)
        samples.append(dataclasses.replace(s, image=None, image_path=path))
    return save_dataset(samples, out_dir / filename)
