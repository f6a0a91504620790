"""Exceptions raised by the influence engine; each message says what went wrong and what to change."""


class InfluenceError(ValueError):
    """Bad input to the engine (edits, model, loss, configuration)."""


class NotPositiveDefiniteError(InfluenceError):
    """The damped curvature H + λI showed non-positive curvature where the solver needs it positive.

    ``rayleigh`` (when known) is pᵀHp/pᵀp along the offending direction p, without λ: a certificate that H has an
    eigenvalue ≤ ``rayleigh``, so λ must exceed −rayleigh."""

    def __init__(self, message: str, rayleigh: float | None = None) -> None:
        super().__init__(message)
        self.rayleigh = rayleigh


class SolverDivergedError(RuntimeError):
    """A solver produced NaN/inf or a residual that grew past its divergence guard; nothing is returned."""
