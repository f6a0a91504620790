"""mmerase: make a fine-tuned (vision-)language model forget or correct training samples via influence functions
on its PEFT adapter.

The package namespace is lazy: ``import mmerase`` (or a torch-free submodule such as :mod:`mmerase.options`) does
not import torch; ``mmerase.InfluenceEngine`` and the other names below load the engine on first use.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any

__all__ = ["Edit", "InfluenceEngine", "SolveResult", "SolverConfig", "Task"]
__version__ = "0.1.0"


class _DropKnownNoise(logging.Filter):
    """bitsandbytes announces at import time that an optional CPU kernel package is missing; its fallback works,
    so the line only alarms users (it appears whenever peft is imported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKnownNoise())

# transformers ≥ 5.25 swaps RMSNorm, rotary and other forwards for "hub kernels" (the `kernels` package) unless
# told not to: they are fetched from the hub at run time, compute in their own precision (a float64 sample's loss
# then moves by ~1e-8 with its batch-mates, breaking exact checks) and need not support the double backward of
# exact curvature products. mmerase runs transformers' own PyTorch code; set USE_HUB_KERNELS=YES to override.
os.environ.setdefault("USE_HUB_KERNELS", "NO")


class _SourceTreeEval:
    """Finds ``mmerase.eval`` in a source checkout, where eval/ sits beside mmerase/ (an installed mmerase carries
    it as a subpackage, see pyproject.toml), so the tree also runs from ``PYTHONPATH=checkout`` without installing.
    Registered only in a checkout, and answers for that one name only."""

    root = Path(__file__).resolve().parent.parent

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> Any:
        return PathFinder.find_spec(fullname, [str(cls.root)]) if fullname == __name__ + ".eval" else None


if (_SourceTreeEval.root / "pyproject.toml").is_file() and (_SourceTreeEval.root / "eval" / "__init__.py").is_file() \
        and _SourceTreeEval not in sys.meta_path:
    sys.meta_path.insert(0, _SourceTreeEval)  # type: ignore[arg-type]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".influence", __name__), name)
    raise AttributeError(f"module 'mmerase' has no attribute {name!r}")
