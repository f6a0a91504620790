"""The files mmerase and its evaluation harness read and write (torch-free).

Reading: JSON and JSON Lines whose errors name the file and, for a syntax error, the line (:class:`FileFormatError`,
one line a CLI can print); a key given twice in one object and nesting deeper than :data:`MAX_NESTING` are errors
too, since either would otherwise be read silently (the last value wins) or blow the stack. :func:`shown` is the
one way user input is echoed in a message: bounded in size and in the work it takes, control characters escaped. Writing: JSON kept strict (non-finite floats become null) and outputs that appear only
when complete: a file or folder is written under a temporary name beside its destination and renamed into place,
so an interrupted or failed run never leaves half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import reprlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


class FileFormatError(ValueError):
    """A file that is missing, unreadable or not the JSON / JSON Lines expected; the message names the file (and
    the line of a syntax error)."""


class OutputExistsError(FileExistsError):
    """The output path exists; outputs are never overwritten unless asked."""


# ------------------------------------------------------------------------------------------------------ echoing input
SHOWN_CHARS = 80  # the most characters of one user value a message repeats
_REPR = reprlib.Repr()  # bounded in depth and width, so its work is too (Python 3.10 takes no keyword arguments)
for _name, _limit in {"maxlevel": 2, "maxtuple": 4, "maxlist": 4, "maxarray": 4, "maxdict": 4, "maxset": 4,
                      "maxfrozenset": 4, "maxdeque": 4, "maxstring": SHOWN_CHARS, "maxlong": 40,
                      "maxother": SHOWN_CHARS}.items():
    setattr(_REPR, _name, _limit)


def shown(value: object, limit: int = SHOWN_CHARS, *, quote: bool = True) -> str:
    """``value`` as a message may repeat it: at most ``limit`` characters of it (the rest counted), built in bounded
    work whatever its size or nesting (a YAML alias bomb's expansion is never walked), with every control or
    non-printing character escaped (a terminal escape sequence or a newline in an id cannot act on the terminal or
    cut the message). Strings are quoted unless ``quote=False``; other values are a bounded ``repr``."""
    if isinstance(value, str):
        head = value[:limit]
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in head)
        text = text.replace("'", "\\'") if quote else text
        more = len(value) - len(head)
        tail = f"… ({more} more characters)" if more > 0 else ""
        return (f"'{text}'" if quote else text) + tail
    text = _REPR.repr(value)
    return shown(text, limit, quote=False)


def one_line(message: str, limit: int = 1000) -> str:
    """A message as one bounded line, the CLIs' last guard: control characters escaped, at most ``limit`` bytes of
    UTF-8 once escaped (a cut is marked with …)."""
    text = shown(str(message), limit, quote=False)
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit - 4].decode("utf-8", "ignore") + " …"


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


MAX_NESTING = 100  # JSON / YAML nesting deeper than this is refused: no file mmerase reads needs more


class JSONContentError(ValueError):
    """Valid JSON syntax that mmerase still refuses: a key given twice in one object, or nesting too deep."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JSONContentError(f"key {shown(key)} is given twice in one object")
        out[key] = value
    return out


def parse_json(text: str) -> Any:
    """``json.loads`` that refuses a duplicate key (:class:`JSONContentError`; plain json keeps the last value) and
    nesting deeper than :data:`MAX_NESTING` (which would otherwise raise RecursionError, or pass and break later
    code); a syntax error is json's :class:`json.JSONDecodeError`."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise JSONContentError(f"nested deeper than {MAX_NESTING} levels") from None
    check_nesting(data)
    return data


def check_nesting(data: Any, limit: int = MAX_NESTING, max_values: int | None = None) -> None:
    """Raise :class:`JSONContentError` if lists / mappings inside ``data`` nest deeper than ``limit``, or (with
    ``max_values``) hold more values than that in all, counting a shared value — a YAML alias — each time it is
    met, so an alias bomb is stopped after ``max_values`` steps instead of being walked."""
    stack, seen = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if max_values is not None and seen > max_values:
            raise JSONContentError(f"holds more than {max_values} values (or YAML aliases that expand to them)")
        if isinstance(node, (list, tuple, dict)):
            if depth >= limit:
                raise JSONContentError(f"nested deeper than {limit} levels")
            items = node.values() if isinstance(node, dict) else node
            stack.extend((v, depth + 1) for v in items)


def _syntax_error(path: PathLike, e: json.JSONDecodeError, lineno: int | None = None) -> FileFormatError:
    return FileFormatError(f"{path}:{lineno or e.lineno}: invalid JSON ({e.msg} at column {e.colno})")


def read_json(path: PathLike) -> Any:
    """One JSON document; a syntax error is reported with its line and column."""
    text = read_text(path)
    try:
        return parse_json(text)
    except json.JSONDecodeError as e:
        raise _syntax_error(path, e) from None
    except JSONContentError as e:
        raise FileFormatError(f"{path}: {e}") from None


def read_json_object(path: PathLike, what: str) -> dict[str, Any]:
    """A JSON file that must hold one object (a run record, a config): :func:`read_json`'s errors, and a
    :class:`FileFormatError` naming ``what`` and the file when it holds something else."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: {what}: expected a JSON object, found a {type(data).__name__}")
    return data


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
            obj = parse_json(line)
        except json.JSONDecodeError as e:
            raise _syntax_error(path, e, lineno) from None
        except JSONContentError as e:
            raise FileFormatError(f"{path}:{lineno}: {e}") from None
        yield lineno, obj


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
        return parse_json(text), "json"
    except JSONContentError as e:
        raise FileFormatError(f"{path}: {e}") from None
    except json.JSONDecodeError as whole:
        lines = [ln for ln in jsonl_lines(text) if ln.strip()]
        if len(lines) < 2 or not _parses(lines[0]):
            raise _syntax_error(path, whole) from None
    return [obj for _, obj in iter_jsonl(path)], "jsonl"


def _parses(text: str) -> bool:
    try:
        parse_json(text)
    except ValueError:  # JSONDecodeError is one
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


class OutputPathError(ValueError):
    """An output path that cannot be written, or whose writing would change an input; found before any work."""


class OutputBusyError(OutputPathError):
    """Another process is writing the same output right now."""


PARTIAL = ".partial-"
_PARTIAL_EXTRA = len(PARTIAL) + 10  # the leading dot and mkstemp's 8 random characters, added to the name


def check_output_path(out: PathLike, *, inputs: Iterable[PathLike | None] = (), what: str = "output") -> Path:
    """Refuse, before any work, an output ``out`` that exists (a dangling symlink included), whose parent is a file
    or not writable, whose name (or a missing parent's) is too long for the file system once the partial suffix
    is added, or that is or lies inside one of ``inputs`` (writing there would change an input). Creates nothing;
    raises :class:`OutputExistsError` or :class:`OutputPathError` naming ``out``."""
    out = Path(out)
    if os.path.lexists(out):
        raise OutputExistsError(f"{what} {out} already exists; choose another --out or remove it")
    if out.name in ("", ".", ".."):
        raise OutputPathError(f"{what} {shown(str(out))} names no file or folder")
    parent, missing = out.absolute().parent, [out.name]
    while not os.path.lexists(parent):
        missing.append(parent.name)
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{what} {out}: cannot be created, {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {out}: cannot be created, {parent} is not writable")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for name in missing:
        if len(os.fsencode(name)) + _PARTIAL_EXTRA > limit:
            raise OutputPathError(f"{what} {shown(str(out))}: the name {shown(name)} is too long "
                                  f"({len(os.fsencode(name))} bytes; at most {limit - _PARTIAL_EXTRA} here)")
    target = out.resolve()
    for item in inputs:
        if item is None or not os.path.exists(item):  # nothing there to change (a preset's or hub id's name)
            continue
        source = Path(item).resolve()
        if target == source or source in target.parents:
            raise OutputPathError(f"{what} {out} lies inside the input {item}; writing it would change the input "
                                  "(choose an --out outside it)")
    return out


def _lock(path: Path) -> int:
    """An exclusive advisory lock held on ``path`` (a file or a folder) for as long as the process keeps the
    returned descriptor open; the kernel frees it when the process dies, however it dies."""
    fd = os.open(path, os.O_RDONLY)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no second-writer check
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _claim(out: Path, mine: Path) -> None:
    """Make ``mine`` the one partial output of ``out``: a sibling partial that is locked belongs to a live writer
    (:class:`OutputBusyError`); an unlocked one was left by a killed run and is removed."""
    out, mine = out.absolute(), mine.absolute()  # mkstemp / mkdtemp return absolute paths, --out may be relative
    for other in out.parent.glob(f".{glob_escape(out.name)}{PARTIAL}*"):
        if other == mine:
            continue
        try:
            fd = _lock(other)
        except FileNotFoundError:
            continue  # finished or cleaned up meanwhile
        except OSError:
            raise OutputBusyError(f"another mmerase process is writing {out} (its partial output {other.name} is "
                                  "in use); wait for it to finish or choose another --out") from None
        try:
            _remove(other)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    """Remove a partial output (a folder or a file), whatever state it is in."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_modes(root: Path) -> None:
    """Give a finished output the modes a plain ``mkdir`` / ``open`` would have (mkdtemp and mkstemp make 0700 /
    0600, readable by no one else)."""
    mask = _umask()
    paths = [root] + (sorted(root.rglob("*")) if root.is_dir() else [])
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out`` (never over an existing ``out`` unless ``overwrite``); on failure
    ``tmp`` is removed and the error says why."""
    try:
        _publish_modes(tmp)
        if os.path.lexists(out) and not overwrite:
            raise OutputExistsError(f"output {out} appeared while this run was writing it; the new output was "
                                    "discarded (choose another --out)")
        if overwrite and tmp.is_dir() and out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputExistsError):
            raise OutputPathError(f"cannot write {out} ({e.strerror or e}); nothing was written") from None
        raise


@contextlib.contextmanager
def _partial(out: PathLike, overwrite: bool, inputs: Iterable[PathLike | None], folder: bool) -> Iterator[Path]:
    out = Path(out)
    if not overwrite:
        check_output_path(out, inputs=inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}", dir=out.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}{PARTIAL}", dir=out.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise OutputPathError(f"cannot create {out} ({e.strerror or e})") from None
    lock = None
    try:
        lock = _lock(tmp)
        _claim(out, tmp)
        yield tmp
        _publish(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if lock is not None:
            os.close(lock)


@contextlib.contextmanager
def atomic_output_file(out: PathLike, overwrite: bool = False,
                       inputs: Iterable[PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary file beside ``out``; it becomes ``out`` only if the block finishes.

    Before the block: ``out`` is checked (:func:`check_output_path`, against ``inputs`` too) unless ``overwrite``,
    and the temporary file is created and locked, so an unwritable place or a second writer of the same ``out``
    is refused before any work. An interrupted or failed block, or a failed final rename, leaves nothing; a
    partial file left by a killed run is removed by the next writer. Missing parent folders are created.
    """
    with _partial(out, overwrite, inputs, folder=False) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_output_dir(out: PathLike, overwrite: bool = False,
                      inputs: Iterable[PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; it becomes ``out`` only if the block finishes (see
    :func:`atomic_output_file` for the checks made first and what a failure leaves: nothing). An existing ``out``
    is an :class:`OutputExistsError` unless ``overwrite`` (then it is replaced once the new one is complete)."""
    with _partial(out, overwrite, inputs, folder=True) as tmp:
        yield tmp


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


__all__ = ["FileFormatError", "JSONContentError", "MAX_NESTING", "OutputExistsError", "check_nesting", "one_line",
           "parse_json", "read_json_object", "shown", "OutputBusyError", "OutputPathError", "check_output_path", "glob_escape", "atomic_output_dir", "atomic_output_file", "atomic_write_bytes",
           "atomic_write_text", "dumps", "finite", "iter_jsonl", "jsonl_lines", "read_json", "read_json_or_jsonl",
           "read_text", "sha256_file", "write_json", "write_jsonl"]
