"""The interface every unlearning method implements, the request it gets, and what it returns.

A method is a class registered by name (:mod:`.registry`) with a small config dataclass whose fields declare their
command-line options (:func:`mmerase.options.option`). It says which edit ops it serves; :func:`check_serves`
refuses any other before work starts. :meth:`Method.run` does the work on a :class:`Job` and leaves the model at
the new adapter; :func:`mmerase.methods.unlearn` wraps it with the accounting (:mod:`.accounting`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..options import option
from .registry import METHODS, method_names

#: edit kinds (:attr:`mmerase.influence.Edit.kind`) → the edits file's op names
OP_NAMES = {"remove": "remove", "modify": "modify", "insert": "add"}


class MethodError(ValueError):
    """A request a method cannot serve, a budget it cannot use, or a bad method option (one line, a user error)."""


@dataclass
class MethodOptions:
    """Which unlearning method serves a request and what it may spend (`mmerase unlearn`)."""

    method: str = option("influence", choices=method_names, help=(
        "influence: the influence update (the solver options below); finetune: continue training on the edited "
        "data; ga: gradient ascent on the old versions; graddiff: ga + descent on retained samples; npo: negative "
        "preference optimisation (--beta, --npo-retain); kl: ga + KL to the adapter before the request on retained "
        "samples. The ascent family (ga, graddiff, npo, kl) serves remove, correct and modify; add needs finetune "
        "or influence"))
    budget: str | None = option(None, help=(
        "compute budget: sample passes (600) or a percentage of one retraining (10%%); one sample pass is one "
        "sample's forward and backward. The gradient methods spend it (steps = what fits); influence records "
        "whether its cost was within it"))
    retrain_passes: int | None = option(None, help=(
        "one retraining's sample passes (epochs × n), for budgets in %% and the cost as a fraction of a retraining "
        "when the adapter has no fine-tune run record (default: from the adapter's mmerase_record.json)"))
    estimate: bool = option(False, help=(
        "print what the request will cost (sample passes and a time estimate from one measured gradient and "
        "product) and exit without writing anything"))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if self.budget is not None:
            from .accounting import Budget

            try:
                Budget.parse(self.budget)
            except MethodError as e:
                raise ValueError(str(e)) from None
        if self.retrain_passes is not None and int(self.retrain_passes) < 1:
            raise ValueError(f"retrain_passes must be ≥ 1, got {self.retrain_passes}")


@dataclass
class Job:
    """One request as a method sees it. ``engine`` (an :class:`~mmerase.influence.InfluenceEngine`) holds the model,
    the loss, the collate and the training set; ``budget`` is in sample passes (None: none given);
    ``checkpoints`` (:class:`~.accounting.Checkpoints`) are called back during the run; ``retrain_passes`` turns
    checkpoint budgets in % into sample passes; ``plan`` and ``preconditioner`` serve the influence method; ``meter``
    is the :class:`~.accounting.Meter` measuring the run (its counter gives the passes made so far)."""

    engine: Any
    edits: list[Any]
    config: Any
    budget: float | None = None
    retrain_passes: int | None = None
    checkpoints: Any = None
    plan: Any = None
    preconditioner: Any = None
    meter: Any = None


@dataclass
class MethodOutput:
    """What :meth:`Method.run` returns: ``info`` for the run record (steps, losses, …); the influence method also
    returns its δ (``delta``, to be applied) and solve result (``solve``)."""

    info: dict[str, Any] = field(default_factory=dict)
    delta: dict[str, torch.Tensor] | None = None
    solve: Any = None
    product_samples: int = 0


class Method:
    """Base class: ``name``, ``config_class``, the edit kinds it ``serves`` (``remove``, ``modify``, ``insert``),
    whether it ``spends_budget``; :meth:`run` and :meth:`estimate`."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type] = object
    serves: ClassVar[frozenset[str]] = frozenset({"remove", "modify", "insert"})
    spends_budget: ClassVar[bool] = True

    def default_config(self) -> Any:
        return self.config_class()

    def run(self, job: Job) -> MethodOutput:
        raise NotImplementedError

    def estimate(self, job: Job, costs: dict[str, Any]) -> dict[str, Any]:
        """What ``job`` will cost, without running it: sample passes (exact or a bound) and seconds, from ``costs``
        (:func:`~.accounting.measure_costs`)."""
        raise NotImplementedError


def check_serves(method: Method, edits: Sequence[Any], labels: Sequence[tuple[str, str]] | None = None,
                 how: str = "method ") -> None:
    """Refuse, naming the method and the op, an edit ``method`` cannot serve. ``labels[i]`` = (op name, where) of
    edit i as the user wrote it (e.g. ("correct", "edits file line 3")); ``how`` prefixes the suggested methods
    (``"--method "`` on the command line)."""
    for i, edit in enumerate(edits):
        if edit.kind in method.serves:
            continue
        op, where = labels[i] if labels else (OP_NAMES[edit.kind], f"edit #{i + 1}")
        others = [n for n, cls in METHODS.items() if edit.kind in cls.serves]
        raise MethodError(f"method '{method.name}' cannot serve '{op}' edits ({where}); use {how}"
                          f"{' or '.join(others)}")


__all__ = ["Job", "Method", "MethodError", "MethodOptions", "MethodOutput", "OP_NAMES", "check_serves"]
