"""Figures that mmerase's demo and benchmarks and its evaluation harness report alike (torch-free)."""

from __future__ import annotations


def recovery_ratio(value: float | None, corrupted: float | None, retrained: float | None,
                   tol: float = 1e-12) -> float | None:
    """The share of the gap between the corrupted adapter and the one retrained without the bad data that
    ``value`` (a metric of the unlearned adapter) closes: ``(value - corrupted) / (retrained - corrupted)``, 0 = as
    corrupted, 1 = as retrained. None when undefined: a missing value, or no gap (``|retrained - corrupted| <= tol``).
    """
    if value is None or corrupted is None or retrained is None:
        return None
    gap = retrained - corrupted
    if abs(gap) <= tol:
        return None
    return (value - corrupted) / gap


__all__ = ["recovery_ratio"]
