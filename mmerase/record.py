"""Run records: hashes of inputs, package versions and the machine, written so nothing is half-written.

The writing itself (atomic files and folders, JSON) is :mod:`mmerase.fileio`'s, shared with the evaluation harness;
its names used by mmerase's commands are importable from here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from . import fileio
from .fileio import OutputExistsError, atomic_output_dir, atomic_output_file, sha256_file

PACKAGES = ("mmerase", "torch", "transformers", "peft", "bitsandbytes", "deepspeed", "tokenizers", "numpy")


def sha256_dir(path: str | Path) -> str:
    """Hash of a folder's files (relative names and contents), independent of listing order."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover - informational only
        pass
    return info


def write_json(path: str | Path, data: Any) -> None:
    """A run record or report as indented JSON, written atomically; values JSON has no type for are written as
    strings, floats as they are (NaN included)."""
    fileio.write_json(path, data, strict=False, default=str)


__all__ = ["PACKAGES", "OutputExistsError", "atomic_output_dir", "atomic_output_file", "machine", "sha256_dir",
           "sha256_file", "versions", "write_json"]
