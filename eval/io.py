"""File helpers shared by the evaluators: strict JSON/JSONL reading with line numbers, atomic writes, output folders.

Everything here raises :class:`~eval.errors.UserError` with a message naming the file (and line) so the CLI can print
one clear line instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from eval.errors import UserError


def _open_text(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: file not found")
    if p.is_dir():
        raise UserError(f"{p}: is a folder, expected a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """Load one JSON document; a syntax error is reported with its line and column."""
    text = _open_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def jsonl_lines(text: str) -> list[str]:
    r"""The lines of a JSON Lines text: split on ``"\n"`` only (a ``"\r\n"`` ending is fine too).

    ``str.splitlines`` would also split on U+2028, U+2029, U+0085 and other separators that JSON allows raw inside
    strings (files written with ``ensure_ascii=False`` contain them), cutting a valid record in two.
    """
    return text.split("\n")


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    r"""Yield ``(line_number, object)`` for each non-blank line of a JSONL file; a broken line is an error that
    names it (line numbers count ``"\n"`` only, as editors and ``wc -l`` do)."""
    text = _open_text(path)
    for lineno, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_json_or_jsonl(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """Load a file that may be one JSON document or JSON Lines; returns ``(data, "json"|"jsonl")``.

    A ``.jsonl`` name is always read as JSON Lines. Otherwise the whole text is tried as one document first (benchmark
    tools often write JSON Lines into ``.json`` files, so that is tried next when the first line parses on its own).
    A JSONL result is a list of the line objects.
    """
    if str(path).endswith(".jsonl"):
        return [obj for _, obj in iter_jsonl(path)], "jsonl"
    text = _open_text(path)
    try:
        return json.loads(text), "json"
    except json.JSONDecodeError as whole:
        lines = [ln for ln in jsonl_lines(text) if ln.strip()]
        first_ok = False
        if len(lines) > 1:
            try:
                json.loads(lines[0])
                first_ok = True
            except json.JSONDecodeError:
                pass
        if not first_ok:
            raise UserError(f"{path}:{whole.lineno}: invalid JSON ({whole.msg} at column {whole.colno})") from None
    return [obj for _, obj in iter_jsonl(path)], "jsonl"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (for run manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """Replace non-finite floats by None so output files stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text (no NaN/Infinity), UTF-8 kept readable."""
    return json.dumps(_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file through a temporary sibling and ``os.replace``: a kill mid-write never leaves half a file."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Any]) -> None:
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))


def check_out_dir(path: str | os.PathLike[str]) -> None:
    """Fail early (before any work) if the output folder could not be used; creates nothing."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p}: output path exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{p}: output folder is not writable")
        return
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{p}: cannot create output folder ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{p}: cannot create output folder ({parent} is not writable)")


def ensure_out_dir(path: str | os.PathLike[str]) -> Path:
    """Create the output folder if needed and check it is writable; a clear UserError otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: output path exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{p}: cannot create output folder ({e.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{p}: output folder is not writable ({e.strerror})") from None
    return p


class OutDirLock:
    """Exclusive advisory lock on ``<out>/.lock``: two runs never interleave one cache; freed when the process dies."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> OutDirLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{self.path.parent}: another evaluation is running in this output folder") from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
