"""The registry of unlearning methods: name → :class:`~.base.Method` subclass, filled by the method modules.

It lives apart from them so that :class:`~.base.MethodOptions` can take its choices from it (for validation and for
the command line) without importing the modules that use it.
"""

from __future__ import annotations

from typing import Any

#: method name → :class:`~.base.Method` subclass
METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: serve ``--method cls.name`` (and ``unlearn(method=cls.name)``) with ``cls``."""
    METHODS[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Any:
    """An instance of the method registered as ``name`` (a :class:`~.base.MethodError` naming the choices if none)."""
    from .base import MethodError

    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MethodError(f"unknown method '{name}'{hint}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "get_method", "method_names", "register_method"]
