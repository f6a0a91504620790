"""The evaluators' files: :mod:`mmerase.fileio`'s strict JSON / JSON Lines reading and atomic writing, with its
errors raised as :class:`~mmerase.eval.errors.UserError` (a message naming the file and line, which the CLI prints as
one line), and the output folder of a run: checked before any work, and locked while a run uses it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmerase import fileio
from mmerase.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    dumps,
    jsonl_lines,
    one_line,
    parse_json,
    sha256_file,
    shown,
    write_json,
    write_jsonl,
)

from .errors import UserError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Raise a file's :class:`~mmerase.fileio.FileFormatError` as a :class:`UserError` with the same message."""
    try:
        yield
    except fileio.FileFormatError as e:
        raise UserError(str(e)) from None


def shown_some(values: Sequence[Any], n: int = 3) -> str:
    """At most ``n`` of ``values`` as a message may list them (each through :func:`~mmerase.fileio.shown`)."""
    head = ", ".join(shown(v) for v in list(values[:n]))
    return head + (f" and {len(values) - n} more" if len(values) > n else "")


def read_text(path: str | os.PathLike[str]) -> str:
    """A UTF-8 text file's content (:func:`mmerase.fileio.read_text`)."""
    with user_errors():
        return fileio.read_text(path)


def read_json(path: str | os.PathLike[str]) -> Any:
    """One JSON document (:func:`mmerase.fileio.read_json`)."""
    with user_errors():
        return fileio.read_json(path)


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(line_number, object)`` per non-blank line of a JSON Lines file (:func:`mmerase.fileio.iter_jsonl`)."""
    with user_errors():
        yield from fileio.iter_jsonl(path)


def read_json_or_jsonl(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(data, "json"|"jsonl")`` from one JSON document or JSON Lines (:func:`mmerase.fileio.read_json_or_jsonl`)."""
    with user_errors():
        return fileio.read_json_or_jsonl(path)


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


__all__ = ["OutDirLock", "atomic_write_bytes", "atomic_write_text", "check_out_dir", "dumps", "ensure_out_dir",
           "iter_jsonl", "jsonl_lines", "one_line", "parse_json", "read_json", "read_json_or_jsonl", "read_text", "sha256_file",
           "shown", "shown_some", "user_errors", "write_json", "write_jsonl"]
