"""Training data: the LLaVA conversation format and the role/content ``messages`` format.

A dataset is a JSON list or a JSONL file of records, in either form::

    {"id": "17", "image": "images/17.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat digit is this?"},
                       {"from": "gpt", "value": "seven"}]}

    {"id": "18", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"},
                                     {"type": "text", "text": "Which is larger?"}]},
        {"role": "assistant", "content": "the second"}]}

``image`` is optional (text-only samples), may be a list (several images, one ``<image>`` placeholder each, in
order) and resolves against the dataset file's folder. A ``messages`` record becomes the same :class:`Sample` as
the equivalent conversation (image parts become ``<image>`` placeholders). Every problem is a :class:`DataError`
whose message names the file, the record and the field, so a user can fix the data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from .fileio import FileFormatError, JSONContentError, jsonl_lines, parse_json, read_text, shown

IMAGE_PLACEHOLDER = "<image>"

# LLaVA data uses "human"/"gpt"; chat templates use "user"/"assistant".
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """Bad training or edit data; the message names the file, record and field."""


ImageRef = Union[Path, Image.Image]


@dataclass
class Sample:
    """One training sample: a conversation and its images (none, one, or several).

    ``conversations`` keeps the LLaVA form (``{"from": ..., "value": ...}``), one ``<image>`` placeholder per image
    in the order of the images. The first image is given either as a path (``image_path``, already resolved) or as
    a loaded PIL image (``image``, e.g. an edit's new image); when both are set the loaded image wins. Further images
    of a multi-image sample are ``extra_images`` (paths or PIL images, in placeholder order).
    """

    id: str
    conversations: list[dict[str, str]]
    image_path: Path | None = None
    image: Image.Image | None = field(default=None, repr=False)
    extra_images: tuple[ImageRef, ...] = field(default=(), repr=False)

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_path is not None or bool(self.extra_images)

    @property
    def image_count(self) -> int:
        """How many images the sample has (= ``<image>`` placeholders in its conversation)."""
        return int(self.image is not None or self.image_path is not None) + len(self.extra_images)

    @property
    def image_refs(self) -> list[ImageRef]:
        """The images in placeholder order, each a path or a PIL image."""
        first = self.image if self.image is not None else self.image_path
        return ([] if first is None else [first]) + list(self.extra_images)

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
        """The sample's (first) image as RGB, or ``None`` for a text-only sample."""
        images = self.load_images()
        return images[0] if images else None

    def load_images(self) -> list[Image.Image]:
        """All the sample's images as RGB, in placeholder order."""
        return [load_image_ref(ref, f"sample {shown(self.id)}: field 'image'") for ref in self.image_refs]

    def to_record(self, root: str | Path | None = None) -> dict[str, Any]:
        """The LLaVA-format record (image paths relative to ``root`` when they lie below it; a list when the
        sample has several images). A sample whose image exists only in memory cannot be written as a record; save
        the image first."""
        record: dict[str, Any] = {"id": self.id}
        if self.image is not None and self.image_path is None or any(
                isinstance(r, Image.Image) for r in self.extra_images):
            raise DataError(f"sample {shown(self.id)}: its image exists only in memory; save it to a file to write a record")
        paths = [self.image_path] if self.image_path is not None else []
        paths += [Path(r) for r in self.extra_images]
        rel = [_relative(p, root) for p in paths]
        if rel:
            record["image"] = rel[0] if len(rel) == 1 else rel
        record["conversations"] = [dict(turn) for turn in self.conversations]
        return record


def _relative(path: Path, root: str | Path | None) -> str:
    path = Path(path)
    if root is not None:
        try:
            path = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            pass
    return path.as_posix()


def load_image_ref(ref: ImageRef, where: str) -> Image.Image:
    """An image reference (path or PIL image) as an RGB PIL image; a :class:`DataError` naming ``where`` and the
    file if it cannot be read."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    return _open_image(Path(ref), where)


def image_name(ref: ImageRef) -> str:
    """How an image is named in messages: its file path, or ``<in-memory image>``."""
    return "<in-memory image>" if isinstance(ref, Image.Image) else str(ref)


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


def validate_conversations(conversations: Any, n_images: int | bool, where: str) -> list[dict[str, str]]:
    """Check a LLaVA ``conversations`` list for a sample with ``n_images`` images and return a clean copy; ``where``
    prefixes error messages."""
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
                f"{where}: field 'conversations[{t}].from' is {shown(role)}; expected one of {sorted(ROLE_ALIASES)}"
            )
        if not isinstance(value, str):
            raise DataError(f"{where}: field 'conversations[{t}].value' must be a string")
        n = value.count(IMAGE_PLACEHOLDER)
        if n and ROLE_ALIASES[role] != "user":
            raise DataError(f"{where}: field 'conversations[{t}].value': the {IMAGE_PLACEHOLDER} placeholder "
                            f"must be in a user turn, not a {role!r} turn")
        n_placeholders += n
        clean.append({"from": role, "value": value})
    roles = [ROLE_ALIASES[turn["from"]] for turn in clean]
    if "assistant" not in roles:
        raise DataError(f"{where}: field 'conversations' has no assistant ('gpt') turn to train on")
    if "user" not in roles[:roles.index("assistant")]:
        raise DataError(f"{where}: field 'conversations': the first assistant turn has no user ('human') turn "
                        "before it; a sample is a question and its answer")
    _check_placeholders(n_placeholders, int(n_images), where)
    return clean


def _check_placeholders(n_placeholders: int, n_images: int, where: str) -> None:
    if n_images and n_placeholders == 0:
        raise DataError(f"{where}: field 'image' is set but no turn contains the {IMAGE_PLACEHOLDER} placeholder")
    if not n_images and n_placeholders:
        raise DataError(f"{where}: field 'conversations' contains {IMAGE_PLACEHOLDER} but the record has no 'image'")
    if n_placeholders != n_images:
        raise DataError(f"{where}: field 'conversations' contains {n_placeholders} {IMAGE_PLACEHOLDER} "
                        f"placeholder(s) for {n_images} image(s); give one placeholder per image, in order")


def _part_text(part: Any, where: str, root: str | Path, images: list[Path], check: bool) -> str:
    """One ``messages`` content part as conversation text (an image part adds its file to ``images``)."""
    if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
        raise DataError(f"{where}: expected an object with 'type' 'text' or 'image'")
    if part["type"] == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}.text: must be a string")
        if IMAGE_PLACEHOLDER in text:
            raise DataError(f"{where}.text contains {IMAGE_PLACEHOLDER}; give each image as an image part")
        return text
    ref = part.get("image", part.get("path"))
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{where}: an image part needs 'image': a file path (string)")
    path = Path(root) / ref
    if check:
        _check_image_file(path, where)
    images.append(path)
    return IMAGE_PLACEHOLDER


def conversations_from_messages(messages: Any, root: str | Path, where: str, check_images: bool = True,
                                ) -> tuple[list[dict[str, str]], list[Path]]:
    """A ``messages`` list (``role`` + ``content``: a string or text / image parts) → LLaVA turns and the image
    files in order. Parts of one turn are joined by newlines, an image part becoming ``<image>``."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of turns")
    turns: list[dict[str, str]] = []
    images: list[Path] = []
    for t, msg in enumerate(messages):
        here = f"{where}: field 'messages[{t}]"
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise DataError(f"{here}' must be an object with 'role' and 'content'")
        if msg["role"] not in ROLE_ALIASES:
            raise DataError(f"{here}.role' is {shown(msg['role'])}; expected one of {sorted(ROLE_ALIASES)}")
        content = msg["content"]
        if isinstance(content, str):
            value = content
        elif isinstance(content, list) and content:
            value = "\n".join(_part_text(p, f"{here}.content[{j}]'", root, images, check_images)
                              for j, p in enumerate(content))
        else:
            raise DataError(f"{here}.content' must be a string or a non-empty list of parts")
        turns.append({"from": msg["role"], "value": value})
    return turns, images


def _record_images(record: Mapping, where: str, root: str | Path, check: bool) -> list[Path]:
    image = record.get("image")
    if image is None:
        return []
    refs = image if isinstance(image, list) else [image]
    if not refs or not all(isinstance(r, str) and r for r in refs):
        raise DataError(f"{where}: field 'image' must be a file path (string) or a list of them")
    paths = [Path(root) / r for r in refs]
    if check:
        for k, p in enumerate(paths):
            _check_image_file(p, f"{where}: field 'image'" + (f"[{k}]" if isinstance(image, list) else ""))
    return paths


def sample_from_record(record: Any, root: str | Path, *, source: str = "<record>", index: int | None = None,
                       label: str | None = None, check_image: bool = True) -> Sample:
    """Validate one record (``conversations`` or ``messages`` form) and build a :class:`Sample` (images resolved
    against ``root``).

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
    where = f"{source}: {label} (id {shown(sid)})"
    if "messages" in record:
        if "conversations" in record or "image" in record:
            raise DataError(f"{where}: a 'messages' record gives its images as image parts and has no "
                            "'conversations' or 'image' field")
        turns, paths = conversations_from_messages(record["messages"], root, where, check_image)
    else:
        turns, paths = record.get("conversations"), _record_images(record, where, root, check_image)
    conversations = validate_conversations(turns, len(paths), where)
    return Sample(id=sid, conversations=conversations, image_path=paths[0] if paths else None,
                  extra_images=tuple(paths[1:]))


def _read_records(path: Path) -> tuple[list[tuple[int, Any]], bool]:
    """((position, record) pairs, is_jsonl) from a JSON list or a JSONL file; JSONL positions are line numbers."""
    if not path.exists():
        raise DataError(f"{path}: dataset file not found")
    try:
        text = read_text(path)
    except FileFormatError as exc:
        raise DataError(f"dataset file {exc}") from None
    data: Any = None
    jsonl = path.suffix.lower() == ".jsonl"
    if not jsonl:
        try:
            data = parse_json(text)
        except JSONContentError as exc:
            raise DataError(f"{path}: {exc}") from None
        except json.JSONDecodeError as exc:
            if not (exc.msg == "Extra data" and text.lstrip().startswith("{")):  # else: JSONL named ".json"
                raise DataError(f"{path}: malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
            jsonl = True
    if jsonl:
        records = []
        for lineno, line in enumerate(jsonl_lines(text), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, parse_json(line)))
            except JSONContentError as exc:
                raise DataError(f"{path}: line {lineno}: {exc}") from None
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
            raise DataError(f"{path}: {label}: duplicate id {shown(sample.id)} (first used at {seen[sample.id]})")
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
            raise DataError(f"duplicate sample id {shown(s.id)}")
        index[s.id] = s
    return index


def get_sample(samples: Sequence[Sample] | Mapping[str, Sample], sample_id: str | int) -> Sample:
    """The sample with ``sample_id``; a :class:`DataError` naming the id if there is none."""
    index = samples if isinstance(samples, Mapping) else index_by_id(samples)
    try:
        return index[str(sample_id)]
    except KeyError:
        raise DataError(f"no sample with id {shown(str(sample_id))} in the training data ({len(index)} samples)") from None


def modify_sample(sample: Sample, *, query: str | None = None, response: str | None = None,
                  image: ImageArg | Sequence[ImageArg] | None = None, root: str | Path | None = None,
                  query_turn: int = 0, response_turn: int = -1, new_id: str | None = None) -> Sample:
    """A copy of ``sample`` with a new query text, response text and/or image(s) (the edited z_new of an edit).

    ``query`` replaces the user turn number ``query_turn`` (default: the first), ``response`` the assistant turn
    number ``response_turn`` (default: the last). ``image`` is a path (relative paths resolve against ``root``) or a
    PIL image, replacing the sample's image; a list replaces all of a multi-image sample's images. The result is
    validated like a loaded record: e.g. a new query must keep one ``<image>`` placeholder per image.
    """
    conversations = [dict(turn) for turn in sample.conversations]
    where = f"edit of sample {shown(sample.id)}"

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
    refs: list[ImageRef] = sample.image_refs
    if image is not None:
        many = isinstance(image, (list, tuple))
        if not many and len(refs) > 1:
            raise DataError(f"{where}: field 'image': the sample has {len(refs)} images; give a list of "
                            f"{len(refs)} new images")
        refs = [_new_image(x, root, f"{where}: field 'image'" + (f"[{k}]" if many else ""))
                for k, x in enumerate(image if many else [image])]
    conversations = validate_conversations(conversations, len(refs), where)
    first, rest = (refs[0], tuple(refs[1:])) if refs else (None, ())
    return dataclasses.replace(
        sample, id=sample.id if new_id is None else str(new_id), conversations=conversations,
        image_path=first if isinstance(first, Path) else (sample.image_path if image is None else None),
        image=first if isinstance(first, Image.Image) else None, extra_images=rest)


ImageArg = Union[str, Path, Image.Image]


def _new_image(image: ImageArg, root: str | Path | None, where: str) -> ImageRef:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, Path)):
        raise DataError(f"{where}: must be a file path or an image")
    path = Path(image) if root is None or Path(image).is_absolute() else Path(root) / image
    _check_image_file(path, where)
    return path


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
