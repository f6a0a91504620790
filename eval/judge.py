"""LLM judge client: OpenAI-compatible chat completions, own retry/backoff, append-only answer cache, cost meter.

Why our own retries: the ``openai`` client is built with ``max_retries=0`` so that the rules are ours and testable —
429/5xx/timeouts/connection errors back off exponentially with jitter and never retry sooner than the server's
``Retry-After``; 400-class request errors are never retried; 401/403/404 stop the whole run (every request would fail).

Why a cache: judged runs cost money and take hours. Every successful reply is appended to a JSONL file (flushed and
fsynced per record) under a hash of (judge model, prompt, prediction, temperature, run index, max_tokens). A killed
run re-reads the file and asks nothing that was already answered; a changed prediction or ground truth changes the
prompt and is judged again. Failures are never written to the cache.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import EvalError, UserError
from .io import dumps
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


class JudgeCache:
    """Append-only JSONL of successful judge replies, one object per line with a ``key`` field.

    Each record is flushed and fsynced as it is written, so at most the line being written when the process died is
    lost; such a torn last line is skipped (and counted in ``bad_lines``) when the file is read back.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self.bad_lines = 0
        if self.path.exists():
            self._load()
        try:
            self._fh = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise UserError(f"{self.path}: cannot open judge cache for appending ({e.strerror})") from None
        self._repair_tail()

    def _repair_tail(self) -> None:
        """A last line without its newline was being written when the process died: drop it if it is not a
        complete record (it was counted in ``bad_lines``), else finish it, so new records start on a fresh line."""
        with open(self.path, "rb") as f:
            data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            rec = json.loads(data[start:])
            complete = isinstance(rec, dict) and "key" in rec and "content" in rec
        except (json.JSONDecodeError, UnicodeDecodeError):
            complete = False
        if complete:
            self._fh.write("\n")
            self._fh.flush()
        else:
            os.truncate(self.path, start)

    def _load(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    self.bad_lines += 1
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("content"), str):
                    self._records[rec["key"]] = rec
                else:
                    self.bad_lines += 1
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
