"""The influence engine: the one place for mmerase's math (edit gradients, curvature products, solvers)."""

from .config import SolverConfig
from .curvature import Curvature, make_curvature
from .edits import Edit
from .engine import InfluenceEngine, SolveResult
from .errors import InfluenceError, NotPositiveDefiniteError, SolverDivergedError
from .plan import SolvePlan, resolve
from .precondition import Preconditioner, PreconditionerConfig, build_preconditioner
from .registry import CURVATURES, SOLVERS
from .surrogate import AnchoredSurrogate, SubspaceSurrogate
from .task import Task

__all__ = [
    "AnchoredSurrogate", "SubspaceSurrogate",
    "CURVATURES", "Curvature", "Edit", "InfluenceEngine", "InfluenceError", "NotPositiveDefiniteError",
    "Preconditioner", "PreconditionerConfig", "SOLVERS", "SolvePlan", "SolveResult", "SolverConfig",
    "SolverDivergedError", "Task", "build_preconditioner", "make_curvature", "resolve",
]
