"""The influence engine: the one place for mmerase's math (edit gradients, curvature products, solvers)."""

from .config import CURVATURES, SOLVERS, SolverConfig
from .curvature import CURVATURE_BACKENDS, Curvature, make_curvature
from .edits import Edit
from .engine import InfluenceEngine, SolveResult
from .errors import InfluenceError, NotPositiveDefiniteError, SolverDivergedError
from .precondition import Preconditioner, PreconditionerConfig, build_preconditioner
from .task import Task

__all__ = [
    "CURVATURES", "CURVATURE_BACKENDS", "Curvature", "Edit", "InfluenceEngine", "InfluenceError",
    "NotPositiveDefiniteError", "Preconditioner", "PreconditionerConfig", "SOLVERS", "SolveResult", "SolverConfig",
    "SolverDivergedError", "Task", "build_preconditioner", "make_curvature",
]
