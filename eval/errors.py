"""Exception types: the CLI maps each to one stderr line and an exit code; library callers can catch them."""

from __future__ import annotations


class EvalError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class UserError(EvalError):
    """Bad input the user can fix: missing or malformed file, unknown option value, unusable output folder (exit 2)."""

    exit_code = 2


class RunStopped(EvalError):
    """A judged run stopped before finishing; everything answered so far is cached and a rerun resumes.

    ``reason`` is one of ``"failures"`` (failure threshold exceeded), ``"fatal"`` (e.g. authentication refused),
    ``"cost"`` (``--max-cost`` reached) or ``"incomplete"`` (finished, but some judgements failed).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 3 if self.reason == "cost" else 1
