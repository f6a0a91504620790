"""Report helpers: Markdown tables, number formatting and the run manifest (inputs' sha256, versions, options)."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import sha256_file

_VERSIONED = ("mmerase", "openai", "numpy", "scikit-learn", "pillow", "pyyaml", "tqdm", "torch", "transformers", "peft")


def fmt(x: Any, places: int = 1) -> str:
    """Format a table cell: floats rounded to ``places`` (like the official evaluators), None as an em dash."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{places}f}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], places: int = 1) -> str:
    """A GitHub-flavoured Markdown table; ``|`` inside cells is escaped."""
    def cell(v: Any) -> str:
        return fmt(v, places).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def package_versions(names: Sequence[str] = _VERSIONED) -> dict[str, str | None]:
    """Installed versions of the packages that can change a result (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def describe_inputs(files: Mapping[str, str | Path | None]) -> dict[str, Any]:
    """``{name: {path, sha256}}`` for each input file given (None entries skipped)."""
    return {
        name: {"path": str(Path(p).resolve()), "sha256": sha256_file(p)}
        for name, p in files.items()
        if p is not None
    }


def manifest(
    command: str,
    inputs: Mapping[str, str | Path | None],
    options: Mapping[str, Any],
    started: float,
    argv: Sequence[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The run manifest written next to every result: enough to tell later exactly what produced it."""
    return {
        "command": command,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "inputs": describe_inputs(inputs),
        "options": dict(options),
        "versions": package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
