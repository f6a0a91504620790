"""The files mmerase and its evaluation harness read and write (torch-free).

Reading: JSON and JSON Lines whose errors name the file and, for a syntax error, the line (:class:`FileFormatError`,
one line a CLI can print). Writing: JSON kept strict (non-finite floats become null) and outputs that appear only
when complete: a file or folder is written under a temporary name beside its destination and renamed into place,
so an interrupted or failed run never leaves half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]
SHARED_FILE_MODE = 0o644  # mkstemp makes 0600; results are meant to be read by others too


class FileFormatError(ValueError):
    """A file that is missing, unreadable or not the JSON / JSON Lines expected; the message names the file (and
    the line of a syntax error)."""


class OutputExistsError(FileExistsError):
    """The output path exists; outputs are never overwritten unless asked."""


# ------------------------------------------------------------------------------------------------------------ reading
def read_text(path: PathLike) -> str:
    """A UTF-8 text file's content; a missing file, a folder or undecodable bytes is a :class:`FileFormatError`."""
    p = Path(path)
    if not p.exists():
        raise FileFormatError(f"{p}: file not found")
    if p.is_dir():
        raise FileFormatError(f"{p}: is a folder, expected a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise FileFormatError(f"{p}: cannot read ({e.strerror})") from None


def _syntax_error(path: PathLike, e: json.JSONDecodeError, lineno: int | None = None) -> FileFormatError:
    return FileFormatError(f"{path}:{lineno or e.lineno}: invalid JSON ({e.msg} at column {e.colno})")


def read_json(path: PathLike) -> Any:
    """One JSON document; a syntax error is reported with its line and column."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _syntax_error(path, e) from None


def jsonl_lines(text: str) -> list[str]:
    r"""The lines of a JSON Lines text: split on ``"\n"`` only (a ``"\r\n"`` ending is fine too).

    ``str.splitlines`` would also split on U+2028, U+2029, U+0085 and other separators that JSON allows raw inside
    strings (files written with ``ensure_ascii=False`` contain them), cutting a valid record in two.
    """
    return text.split("\n")


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    r"""``(line_number, object)`` for each non-blank line of a JSON Lines file; a broken line is an error that names
    it (line numbers count ``"\n"`` only, as editors and ``wc -l`` do)."""
    for lineno, line in enumerate(jsonl_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise _syntax_error(path, e, lineno) from None


def read_json_or_jsonl(path: PathLike) -> tuple[Any, str]:
    """A file that may be one JSON document or JSON Lines: ``(data, "json"|"jsonl")``.

    A ``.jsonl`` name is always read as JSON Lines. Otherwise the whole text is tried as one document first (benchmark
    tools often write JSON Lines into ``.json`` files, so that is tried next when the first line parses on its own).
    A JSON Lines result is the list of the line objects.
    """
    if str(path).endswith(".jsonl"):
        return [obj for _, obj in iter_jsonl(path)], "jsonl"
    text = read_text(path)
    try:
        return json.loads(text), "json"
    except json.JSONDecodeError as whole:
        lines = [ln for ln in jsonl_lines(text) if ln.strip()]
        if len(lines) < 2 or not _parses(lines[0]):
            raise _syntax_error(path, whole) from None
    return [obj for _, obj in iter_jsonl(path)], "jsonl"


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------ writing
def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) inside dicts, lists and tuples replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None, *, strict: bool = True,
          default: Callable[[Any], Any] | None = None) -> str:
    """JSON text with UTF-8 kept readable. ``strict``: non-finite floats become null, so any JSON parser reads it;
    ``default`` turns objects JSON has no type for into ones it has (e.g. ``str``)."""
    if strict:
        return json.dumps(finite(obj), indent=indent, ensure_ascii=False, allow_nan=False, default=default)
    return json.dumps(obj, indent=indent, ensure_ascii=False, default=default)


@contextlib.contextmanager
def atomic_output_file(out: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file beside ``out``; it becomes ``out`` only if the block finishes.

    An interrupted or failed block leaves nothing (the temporary file is removed). An existing ``out`` is an
    :class:`OutputExistsError` unless ``overwrite``. Missing parent folders are created.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output file {out} already exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, SHARED_FILE_MODE)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output_dir(out: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; it becomes ``out`` only if the block finishes.

    An interrupted or failed block leaves nothing under ``out`` (the temporary folder is removed). An existing ``out``
    is an :class:`OutputExistsError` unless ``overwrite`` (then it is replaced once the new one is complete).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # overwrite=True
        shutil.rmtree(out)
    os.replace(tmp, out)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write (or replace) a file through :func:`atomic_output_file`, synced to disk before it takes the name."""
    with atomic_output_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, *, strict: bool = True, default: Callable[[Any], Any] | None = None) -> None:
    """One indented JSON document (see :func:`dumps`), written atomically."""
    atomic_write_text(path, dumps(obj, indent=2, strict=strict, default=default) + "\n")


def write_jsonl(path: PathLike, rows: Iterable[Any]) -> None:
    """JSON Lines, one strict JSON object per row, written atomically."""
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))


__all__ = ["FileFormatError", "OutputExistsError", "atomic_output_dir", "atomic_output_file", "atomic_write_bytes",
           "atomic_write_text", "dumps", "finite", "iter_jsonl", "jsonl_lines", "read_json", "read_json_or_jsonl",
           "read_text", "sha256_file", "write_json", "write_jsonl"]
