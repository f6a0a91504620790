"""The registries of solvers and curvatures: name → implementation, filled by :mod:`.solvers` and :mod:`.curvature`.

They live apart from both so that :class:`~.config.SolverConfig` can take its choices from them (for validation and
for the command line) without importing the modules that use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: solver name → ``solve(problem, config) -> SolverOutput``
SOLVERS: dict[str, Callable[..., Any]] = {}
#: curvature name → :class:`~.curvature.Curvature` subclass
CURVATURES: dict[str, type] = {}


def register_solver(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: serve ``SolverConfig(method=name)`` with the decorated function."""
    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        SOLVERS[name] = fn
        return fn
    return add


def register_curvature(cls: type) -> type:
    """Class decorator: serve ``SolverConfig(curvature=cls.name)`` with ``cls``."""
    CURVATURES[cls.name] = cls
    return cls


def solver_names() -> tuple[str, ...]:
    return tuple(SOLVERS)


def curvature_names() -> tuple[str, ...]:
    return tuple(CURVATURES)
