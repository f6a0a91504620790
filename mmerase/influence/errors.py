"""Exceptions raised by the influence engine; each message says what went wrong and what to change."""


class InfluenceError(ValueError):
    """Bad input to the engine (edits, model, loss, configuration)."""


class NotPositiveDefiniteError(InfluenceError):
    """The damped curvature H + λI showed non-positive curvature where the solver needs it positive."""


class SolverDivergedError(RuntimeError):
    """A solver produced NaN/inf or a residual that grew past its divergence guard; nothing is returned."""
