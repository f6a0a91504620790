"""LLM judge client: OpenAI-compatible chat completions, own retry/backoff, append-only answer cache, cost meter.

Why our own retries: the ``openai`` client is built with ``max_retries=0`` so that the rules are ours and testable —
429/5xx/timeouts/connection errors back off exponentially with jitter and never retry sooner than the server's
``Retry-After``; 400-class request errors are never retried; 401/403/404 stop the whole run (every request would fail).

Why a cache: judged runs cost money and take hours. Every successful reply is appended to a JSONL file (flushed and
fsynced per record) under a hash of (judge model, prompt, prediction, temperature, run index, max_tokens). A killed
run re-reads the file and asks nothing that was already answered; a changed prediction or ground truth changes the
prompt and is judged again. Failures are never written to the cache. The file's first line is the header
``{"mmerase_judge_cache": 1}``: mmerase writes to no file it did not create, so an existing file without that header
(the predictions or an adapter given to ``--cache`` by mistake) is refused without being opened for writing.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import stat
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import EvalError, UserError
from .io import dumps, parse_json, shown
from .pricing import CostCapReached, CostMeter

CACHE_FORMAT = "mmerase-judge-cache/1"


@dataclass(frozen=True)
class Completion:
    """One judge reply: its text, the ``model`` field the server returned, and token usage (None if not sent)."""

    content: str
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class JudgeAPIError(Exception):
    """A judge request failed. ``retryable``: worth retrying after a wait; ``fatal``: stop the whole run."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        fatal: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.fatal = fatal
        self.retry_after = retry_after


class JudgeStopped(Exception):
    """Raised inside a worker when the run is being stopped (cost cap, failure threshold, fatal error, Ctrl-C)."""


class ChatBackend(Protocol):
    """What the judge needs from an API client: one chat completion for one user message."""

    def complete(self, prompt: str, *, temperature: float, max_tokens: int) -> Completion: ...


class Redactor:
    """Removes secrets (the API key) from any text before it is printed or written."""

    def __init__(self, *secrets: str | None) -> None:
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date); None if absent/invalid."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return max(0.0, email.utils.mktime_tz(parsed) - (time.time() if now is None else now))


class OpenAIBackend:
    """Chat completions through the ``openai`` package (any OpenAI-compatible server, or Azure OpenAI)."""

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None = None,
        azure: bool = False,
        api_version: str | None = None,
        timeout: float = 60.0,
        redact: Redactor | None = None,
    ) -> None:
        try:
            import openai
        except ImportError:  # pragma: no cover - depends on the install
            raise UserError("the judge needs the 'openai' package: pip install 'mmerase[judge]'") from None
        self.model = model
        self._redact = redact or Redactor(api_key)
        if azure:
            if not base_url:
                raise UserError("--azure needs --base-url (the Azure endpoint, https://<resource>.openai.azure.com)")
            self._client: Any = openai.AzureOpenAI(
                api_key=api_key, azure_endpoint=base_url, api_version=api_version or "2024-06-01",
                max_retries=0, timeout=timeout,
            )
        else:
            self._client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)

    def complete(self, prompt: str, *, temperature: float, max_tokens: int) -> Completion:
        import openai

        try:
            resp = self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=temperature,
                max_tokens=max_tokens,
            )
        except openai.APITimeoutError:
            raise JudgeAPIError("request timed out", retryable=True) from None
        except openai.APIConnectionError as e:
            raise JudgeAPIError(self._redact(f"connection error: {e.__cause__ or e}")[:500], retryable=True) from None
        except openai.APIStatusError as e:
            status = e.status_code
            msg = self._redact(f"HTTP {status}: {e.message}")[:500]
            retry_after = parse_retry_after(e.response.headers)
            if status in (401, 403, 404):
                raise JudgeAPIError(msg, status=status, fatal=True) from None
            retryable = status in (408, 409, 429) or status >= 500
            raise JudgeAPIError(msg, status=status, retryable=retryable, retry_after=retry_after) from None
        choices = getattr(resp, "choices", None)
        if not choices:
            raise JudgeAPIError("malformed response: no choices", retryable=True)
        content = choices[0].message.content or ""
        usage = getattr(resp, "usage", None)
        return Completion(
            content=content,
            model=str(getattr(resp, "model", "") or ""),
            prompt_tokens=getattr(usage, "prompt_tokens", None) if usage else None,
            completion_tokens=getattr(usage, "completion_tokens", None) if usage else None,
        )


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: wait ~ U[d/2, d], d = min(max_wait, base * 2**attempt); never below the
    server's Retry-After."""

    max_retries: int = 6
    base: float = 1.0
    max_wait: float = 60.0

    def wait(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        d = min(self.max_wait, self.base * (2.0**attempt))
        w = rng.uniform(d / 2.0, d)
        if retry_after is not None:
            w = max(w, retry_after)
        return w


def cache_key(model: str, prompt: str, prediction: str, temperature: float, run: int, max_tokens: int) -> str:
    """Hash identifying one judge question; any change to the inputs (incl. the prediction) makes a new key."""
    payload = json.dumps(
        [CACHE_FORMAT, model, prompt, prediction, round(float(temperature), 6), int(run), int(max_tokens)],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


CACHE_HEADER = {"mmerase_judge_cache": 1}  # the first line of every judge cache file; 1 = this record layout
HEADER_LINE = (dumps(CACHE_HEADER) + "\n").encode("utf-8")
_HEADER_PROBE = 4096  # bytes read from an existing file to tell whether it is a judge cache


def _not_a_cache(path: Path, first: bytes, complete: bool) -> UserError:
    """The refusal of an existing file whose first line is not :data:`HEADER_LINE`, saying what it seems to be."""
    header = HEADER_LINE.decode().strip()
    rec: Any = None
    if complete:
        try:
            rec = parse_json(first.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError and JSONContentError are ValueErrors
            rec = None
    if isinstance(rec, dict) and "mmerase_judge_cache" in rec:
        return UserError(f"{path}: a judge cache of format {shown(rec['mmerase_judge_cache'])}, which this mmerase "
                         f"does not read (it reads {header}); left untouched, give --cache another file")
    if isinstance(rec, dict) and "key" in rec and "content" in rec:
        return UserError(f"{path}: not an mmerase judge cache: its first line is not the header {header} (it looks "
                         "like a cache from before caches had one; to reuse it, insert that line at its top); left "
                         "untouched, mmerase writes to no file it did not create")
    return UserError(f"{path}: not an mmerase judge cache (its first line is not {header}); left untouched, since "
                     "mmerase writes to no file it did not create: give --cache a new path or a cache made by "
                     "'mmerase eval mmvet'")


def _read_cache_file(path: Path, *, whole: bool) -> tuple[str, bytes, tuple[int, int] | None]:
    """``(state, content, (st_dev, st_ino))`` of a judge cache path, opened read-only and written to never.

    ``state`` is ``"missing"``, ``"empty"`` (0 bytes: it can become a cache, nothing is lost) or ``"cache"`` (the
    first line is :data:`HEADER_LINE`); anything else is refused with a :class:`UserError` after reading at most
    :data:`_HEADER_PROBE` bytes. ``content`` is the whole file with ``whole``, else only what was read to check it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # O_NONBLOCK: a FIFO cannot hang us here
    except FileNotFoundError:
        return "missing", b"", None
    except OSError as e:
        raise UserError(f"{path}: cannot read the judge cache ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"{path}: is a folder; --cache takes a judge cache file")
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path}: not a regular file, so not an mmerase judge cache; left untouched")
        ident = (st.st_dev, st.st_ino)
        if st.st_size == 0:
            return "empty", b"", ident
        head = b""
        while len(head) < _HEADER_PROBE and b"\n" not in head:
            block = os.read(fd, _HEADER_PROBE - len(head))
            if not block:
                break
            head += block
        first, newline, _ = head.partition(b"\n")
        if first != HEADER_LINE.rstrip(b"\n"):
            raise _not_a_cache(path, first, complete=bool(newline) or len(head) < _HEADER_PROBE)
        if not whole:
            return "cache", head, ident
        chunks = [head]
        while block := os.read(fd, 1 << 20):
            chunks.append(block)
        return "cache", b"".join(chunks), ident
    finally:
        os.close(fd)


def check_cache_file(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work, a judge cache path that is an existing file other than an empty one or an mmerase
    judge cache (its first line :data:`HEADER_LINE`): such a file is never opened for writing. Creates nothing."""
    _read_cache_file(Path(path), whole=False)


class JudgeCache:
    """Append-only JSONL of successful judge replies: the header line :data:`HEADER_LINE`, then one object per line
    with a ``key`` field.

    mmerase writes only to a cache it made: a missing file is created with the header (an empty one gets it), and an
    existing file whose first line is not the header is refused (:class:`UserError`) without being opened for
    writing, so a ``--cache`` pointed at the predictions or an adapter by mistake costs nothing. Each record is
    flushed and fsynced as it is written, so at most the line being written when the process died is lost; such a
    torn last line is skipped (and counted in ``bad_lines``) when the file is read back, and cut off the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self.bad_lines = 0
        state, data, ident = _read_cache_file(self.path, whole=True)
        if state == "missing":
            self._create()
            state, data, ident = _read_cache_file(self.path, whole=True)
            if state == "missing":  # a symbolic link to nowhere: O_EXCL would not write through it
                raise UserError(f"{self.path}: cannot create the judge cache (a symbolic link to a missing file?)")
        self._load(data)
        try:
            self._fh = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise UserError(f"{self.path}: cannot open judge cache for appending ({e.strerror})") from None
        try:
            st = os.fstat(self._fh.fileno())
            if (st.st_dev, st.st_ino) != ident or st.st_size != len(data):
                raise UserError(f"{self.path}: the judge cache changed while it was being opened (is another run "
                                "using it?); left as it is, run again")
            if state == "empty":
                self._write_raw(HEADER_LINE.decode("utf-8"))
            else:
                self._repair_tail(data)
        except BaseException:
            self._fh.close()
            raise

    def _create(self) -> None:
        """A new cache file holding only the header; never replaces a file (``O_EXCL``)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # appeared meanwhile (or a dangling symbolic link): checked again by the caller
            return
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the judge cache ({e.strerror})") from None
        try:
            os.write(fd, HEADER_LINE)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_raw(self, text: str) -> None:
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _repair_tail(self, data: bytes) -> None:
        """A last line without its newline was being written when the process died: drop it if it is not a
        complete record (it was counted in ``bad_lines``), else finish it, so new records start on a fresh line.
        Only ever called on a file whose header was checked, through the descriptor opened on that same file."""
        if data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        if start == 0 or self._record(data[start:]) is not None:  # the header itself, or a whole record
            self._write_raw("\n")
        else:
            self._fh.flush()
            os.ftruncate(self._fh.fileno(), start)

    @staticmethod
    def _record(line: bytes) -> dict[str, Any] | None:
        try:
            rec = parse_json(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError and JSONContentError are ValueErrors
            return None
        if isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("content"), str):
            return rec
        return None

    def _load(self, data: bytes) -> None:
        """The records after the header line; an unreadable line is counted and skipped (asked again)."""
        for line in data.split(b"\n")[1:]:
            if not line.strip():
                continue
            rec = self._record(line)
            if rec is None:
                self.bad_lines += 1
            else:
                self._records[rec["key"]] = rec
        if self.bad_lines:
            warnings.warn(f"{self.path}: skipped {self.bad_lines} unreadable cache line(s); they will be asked again")

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._records.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        rec = {"key": key, **record}
        line = dumps(rec) + "\n"
        with self._lock:
            try:
                self._fh.write(line)
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError as e:
                raise EvalError(f"{self.path}: cannot write the judge cache ({e.strerror}); "
                                "the answers recorded before are kept") from None
            self._records[key] = rec

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()


@dataclass
class JudgeStats:
    """Counters of one invocation (cache hits vs. new requests, retries, the models the server reported)."""

    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    server_models: set[str] = field(default_factory=set)


class Judge:
    """Asks one question of the judge: cache first, then the API with retries, under the cost cap and stop flag."""

    def __init__(
        self,
        backend: ChatBackend,
        cache: JudgeCache,
        *,
        model: str,
        retry: RetryPolicy | None = None,
        meter: CostMeter | None = None,
        stop: threading.Event | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.model = model
        self.retry = retry or RetryPolicy()
        self.meter = meter or CostMeter(None)
        self.stop = stop or threading.Event()
        self._sleep = sleep or self._interruptible_sleep
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self.stats = JudgeStats()
        self._stats_lock = threading.Lock()
        self.stop_reason: str | None = None
        self.stop_message: str | None = None

    def _interruptible_sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise JudgeStopped(self.stop_reason or "stopped")

    def request_stop(self, reason: str, message: str) -> None:
        """Stop the run: the first reason wins; workers finish their in-flight request and stop asking."""
        with self._stats_lock:
            if self.stop_reason is None:
                self.stop_reason, self.stop_message = reason, message
        self.stop.set()

    def ask(
        self, prompt: str, *, prediction: str, temperature: float, run: int, max_tokens: int,
        meta: Mapping[str, Any] | None = None,
    ) -> tuple[Completion, bool]:
        """Return ``(completion, from_cache)``. Raises JudgeAPIError after the retries, JudgeStopped when stopping."""
        key = cache_key(self.model, prompt, prediction, temperature, run, max_tokens)
        hit = self.cache.get(key)
        if hit is not None:
            with self._stats_lock:
                self.stats.cache_hits += 1
                if hit.get("response_model"):
                    self.stats.server_models.add(hit["response_model"])
            return _completion_from_record(hit), True
        if self.stop.is_set():
            raise JudgeStopped(self.stop_reason or "stopped")
        prompt_bytes = len(prompt.encode("utf-8"))
        try:
            reservation = self.meter.reserve(prompt_bytes, max_tokens)
        except CostCapReached as e:
            self.request_stop("cost", str(e))
            raise JudgeStopped("cost") from None
        if self.stop.is_set():  # the run stopped while this reservation waited for room under the cap
            self.meter.release(reservation)
            raise JudgeStopped(self.stop_reason or "stopped")
        try:
            comp = self._call_with_retries(prompt, temperature, max_tokens)
        except BaseException:
            self.meter.release(reservation)
            raise
        estimated = comp.prompt_tokens is None or comp.completion_tokens is None
        # no usage in the reply: bill the upper bound (one token per byte, all max_tokens) rather than guess low
        pt = comp.prompt_tokens if comp.prompt_tokens is not None else prompt_bytes
        ct = comp.completion_tokens if comp.completion_tokens is not None else max_tokens
        cost = self.meter.settle(reservation, pt, ct, estimated, prompt_bytes)
        record = {
            "judge_model": self.model,
            "response_model": comp.model,
            "run": run,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "content": comp.content,
            "prompt_tokens": pt,
            "completion_tokens": ct,
            "usage_estimated": estimated,
            "cost": cost if self.meter.price else None,
            "time": time.time(),
            **dict(meta or {}),
        }
        self.cache.put(key, record)
        with self._stats_lock:
            self.stats.requests += 1
            if comp.model:
                self.stats.server_models.add(comp.model)
        return Completion(comp.content, comp.model, pt, ct), False

    def _call_with_retries(self, prompt: str, temperature: float, max_tokens: int) -> Completion:
        attempt = 0
        while True:
            try:
                return self.backend.complete(prompt, temperature=temperature, max_tokens=max_tokens)
            except JudgeAPIError as e:
                if e.fatal:
                    self.request_stop("fatal", f"judge refused the request ({e}); check --base-url, --judge-model "
                                               "and the API key")
                    raise
                if not e.retryable or attempt >= self.retry.max_retries:
                    raise
                with self._rng_lock:
                    wait = self.retry.wait(attempt, e.retry_after, self._rng)
                with self._stats_lock:
                    self.stats.retries += 1
                self._sleep(wait)
                if self.stop.is_set():
                    raise JudgeStopped(self.stop_reason or "stopped") from None
                attempt += 1


def _completion_from_record(rec: Mapping[str, Any]) -> Completion:
    return Completion(
        content=rec["content"],
        model=str(rec.get("response_model") or ""),
        prompt_tokens=rec.get("prompt_tokens"),
        completion_tokens=rec.get("completion_tokens"),
    )
