"""Compute accounting: what an unlearning request cost, in sample passes and as a fraction of one retraining.

**The cost measure (the one definition every method, influence included, is compared by).** A *forward sample pass*
is one sample through the model's forward; a *backward sample pass* is one sweep of a gradient through the network
for one sample. Both are counted by hooks on the model's output layer (:class:`PassCounter`), not by any method's
own arithmetic: a forward of a batch of b counts b; a gradient reaching the output (the logits) of that forward
counts b backward; in a double backward, a gradient reaching a gradient of the output counts b more. So a training
step on b samples is b forward + b backward, a finite-difference Hessian product 2b + 2b, and an exact
Hessian-vector product (Pearlmutter) b forward + 3b backward (the second backward sweeps the first backward's graph
and then the forward graph again). A backward costs about two forwards, so

    sample passes        = (forward + 2·backward) / 3          (one training step on b samples: b)
    retraining fraction  = (forward + 2·backward) / (3 · epochs · n)

with epochs · n the sample passes of one retraining (the adapter's own fine-tune: ``train.epochs`` × ``data.n`` of
its run record, or ``--retrain-passes``). A retraining costs exactly 1. Budgets (:class:`Budget`) are in the same
unit: ``600`` sample passes, or ``10%`` of one retraining.

Alongside: curvature products (the engine's count of samples pushed through products) with a product's measured
cost in gradients (one product and one training step on the same batch, timed in the same run:
:func:`measure_costs`), samples touched, CPU and wall time, and peak memory. Under torch.distributed the counts and
CPU time are summed over the processes (padding passes included: they are real work), wall time and peak memory
are this process's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..fileio import shown
from ..influence.distributed import all_reduce_, world
from ..memory import PeakMemory, product_report, training_step_report
from .base import MethodError

#: what one retraining's passes are made of, for messages
RETRAIN_PASSES_HELP = "epochs × n of the adapter's fine-tune run record (mmerase_record.json: train.epochs, data.n)"


@dataclass(frozen=True)
class Budget:
    """A compute budget: ``value`` sample passes, or (``relative``) ``value`` × one retraining's sample passes."""

    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: "str | float | int | Budget") -> "Budget":
        """``600`` → 600 sample passes; ``10%`` → 0.1 of one retraining. A budget ≤ 0 is refused."""
        if isinstance(text, Budget):
            return text
        raw = str(text).strip()
        relative = raw.endswith("%")
        try:
            value = float(raw[:-1] if relative else raw)
        except ValueError:
            raise MethodError(f"budget {shown(raw)} is neither a number of sample passes (e.g. 600) nor a percentage of "
                              "one retraining (e.g. 10%)") from None
        if not (value > 0) or not math.isfinite(value):
            raise MethodError(f"budget must be > 0 (sample passes, e.g. 600, or a percentage of one retraining, "
                              f"e.g. 10%); got {shown(raw)}")
        return cls(value / 100.0 if relative else value, relative)

    def passes(self, retrain_passes: int | None) -> float:
        """The budget in sample passes (a relative budget needs one retraining's passes)."""
        if not self.relative:
            return self.value
        if not retrain_passes:
            raise MethodError(f"budget {self} is a fraction of one retraining, whose sample passes are unknown: the "
                              f"adapter has no fine-tune run record ({RETRAIN_PASSES_HELP}); give --retrain-passes "
                              "N or a budget in sample passes")
        return self.value * retrain_passes

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


def retraining_passes(record: dict[str, Any] | None) -> int | None:
    """One retraining's sample passes from an adapter's run record: epochs × n of a fine-tune record, or what an
    unlearning record carried forward from the adapter it started from (None when unknown)."""
    if not record:
        return None
    if record.get("command") == "finetune":
        try:
            return int(record["train"]["epochs"]) * int(record["data"]["n"])
        except (KeyError, TypeError, ValueError):
            return None
    passes = (record.get("retraining") or {}).get("passes")
    return int(passes) if passes else None


def output_module(model: nn.Module) -> nn.Module:
    """The layer whose output is the model's logits (``get_output_embeddings``), or the model itself."""
    for m in (model, getattr(model, "module", None)):  # a DeepSpeed engine wraps the model
        get = getattr(m, "get_output_embeddings", None)
        if callable(get):
            head = get()
            if isinstance(head, nn.Module):
                return head
    return model


class PassCounter:
    """Counts forward and backward sample passes through ``model`` by hooks on its output layer (see the module
    docstring). ``with PassCounter(model) as c: ...`` then ``c.forward``, ``c.backward``."""

    def __init__(self, model: nn.Module) -> None:
        self.module = output_module(model)
        self.forward = self.backward = 0
        self._handle: Any = None

    def _on_grad(self, rows: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.backward += rows
            if grad.requires_grad:  # a double backward will sweep this gradient's graph too
                grad.register_hook(self._on_grad(rows))
        return hook

    def _on_forward(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        out = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            return
        rows = int(out.shape[0])
        self.forward += rows
        if out.requires_grad:
            out.register_hook(self._on_grad(rows))

    def __enter__(self) -> "PassCounter":
        self._handle = self.module.register_forward_hook(self._on_forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def sample_key(sample: Any) -> str:
    """A key telling samples apart on every process: id, conversation and image for a Sample (an edit's new version
    differs from its old one), the object's identity otherwise."""
    conv = getattr(sample, "conversations", None)
    if conv is None:
        return f"object:{id(sample)}"
    image = getattr(sample, "image_path", None)
    return json.dumps([str(getattr(sample, "id", "")), conv, str(image), getattr(sample, "image", None) is not None],
                      sort_keys=True, default=str)


@dataclass
class Accounting:
    """What a request cost (see the module docstring for the units)."""

    forward_passes: int = 0
    backward_passes: int = 0
    product_samples: int = 0
    product_cost_gradients: float | None = None
    samples_touched: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    peak_memory: dict[str, Any] = field(default_factory=dict)
    processes: int = 1
    retrain_passes: int | None = None
    budget_passes: float | None = None
    measurement: dict[str, Any] | None = None

    @property
    def sample_passes(self) -> float:
        """(forward + 2·backward) / 3: a training step on b samples costs b."""
        return (self.forward_passes + 2 * self.backward_passes) / 3

    @property
    def retraining_fraction(self) -> float | None:
        """sample passes / one retraining's sample passes (a retraining is exactly 1); None when unknown."""
        return self.sample_passes / self.retrain_passes if self.retrain_passes else None

    @property
    def within_budget(self) -> bool | None:
        return None if self.budget_passes is None else self.sample_passes <= self.budget_passes + 1e-9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sample_passes": self.sample_passes, "retraining_fraction": self.retraining_fraction,
                "within_budget": self.within_budget}


class Meter:
    """Measures a block of work on ``engine`` (an :class:`~mmerase.influence.InfluenceEngine`): passes by hooks,
    samples touched (through the engine's collate), CPU and wall time, peak memory. Every process must call
    :meth:`accounting` (the counts are summed over processes)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.counter = PassCounter(engine.model)
        self.touched: set[str] = set()

    def _recording(self, collate: Callable[[list], Any]) -> Callable[[list], Any]:
        def collate_and_record(samples: list) -> Any:
            self.touched.update(sample_key(s) for s in samples)
            return collate(samples)
        return collate_and_record

    def __enter__(self) -> "Meter":
        self._collate = self.engine.collate_fn
        self.engine.collate_fn = self._recording(self._collate)
        self.counter.__enter__()
        self._memory = PeakMemory(self.engine.device).__enter__()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall_s, self.cpu_s = time.perf_counter() - self._wall, time.process_time() - self._cpu
        self._memory.__exit__(*exc)
        self.counter.__exit__(*exc)
        self.engine.collate_fn = self._collate

    def accounting(self, **extra: Any) -> Accounting:
        """The block's :class:`Accounting` (all-reduced over processes), with ``extra`` fields set."""
        totals = [torch.tensor([self.counter.forward, self.counter.backward, self.cpu_s], dtype=torch.float64)]
        forward, backward, cpu = all_reduce_(totals)[0].tolist()
        touched = self.touched
        if world()[1] > 1:
            gathered: list[Any] = [None] * world()[1]
            torch.distributed.all_gather_object(gathered, sorted(touched))
            touched = set().union(*map(set, gathered))
        return Accounting(forward_passes=int(forward), backward_passes=int(backward), samples_touched=len(touched),
                          cpu_s=cpu, wall_s=self.wall_s, peak_memory=self._memory.result, processes=world()[1],
                          **extra)


def measure_costs(engine: Any, plan: Any = None, batch_size: int = 16) -> dict[str, Any]:
    """One training step on the first training samples and, given a solve ``plan``, one curvature product on the
    same samples (the run record's memory report, :func:`~mmerase.memory.engine_memory_report`), timed and counted:
    seconds per sample pass; a product's cost in gradients (its time over the step's, ``product_cost_gradients``)
    and in counted sample passes per sample (``product_sample_passes``: 7/3 for an exact Hessian product); the
    passes the measurement made; and the memory report itself (``memory_report``). A first step on one sample
    warms the kernels up, so the timed ones are typical."""
    idx = list(range(min(plan.config.batch_size if plan is not None else batch_size, engine.n)))
    with PassCounter(engine.model) as warm:
        training_step_report(engine, [0])
    with PassCounter(engine.model) as step_count:
        report = training_step_report(engine, idx)
    step = report["train_step"]
    out: dict[str, Any] = {"batch_samples": len(idx), "gradient_s": step["seconds"],
                           "sample_pass_s": step["seconds"] / len(idx)}
    passes = [warm, step_count]
    if plan is not None:
        with PassCounter(engine.model) as product_count:
            report["product"] = product_report(engine, plan, idx)
        passes.append(product_count)
        seconds = report["product"]["seconds"]
        out.update(product_s=seconds, product_cost_gradients=seconds / step["seconds"] if step["seconds"] else None,
                   product_sample_passes=(product_count.forward + 2 * product_count.backward) / 3 / len(idx),
                   product_sample_s=seconds / len(idx))
    out.update(forward_passes=sum(c.forward for c in passes), backward_passes=sum(c.backward for c in passes),
               memory_report=report)
    return out


@dataclass
class CheckpointInfo:
    """Where a gradient method stands at a checkpoint: after ``step`` steps, ``sample_passes`` planned passes spent
    (the method's own count, up-front work included), ``budget`` the checkpoint budget reached (None for an
    every-k-steps checkpoint). The model holds the parameters of that step (in eval mode)."""

    step: int
    sample_passes: float
    budget: float | None = None


@dataclass
class Checkpoints:
    """Call ``callback(CheckpointInfo)`` every ``every`` steps and at the last step within each budget of ``at``
    (sample passes, or :class:`Budget` strings such as ``"10%"``), so nested budgets are scored from one run. With a
    constant learning rate (the default) a checkpoint at budget B holds exactly what a run with budget B ends with."""

    callback: Callable[[CheckpointInfo], None]
    every: int | None = None
    at: tuple[Any, ...] = ()


def estimate_from_parts(parts: dict[str, tuple[float, float]], costs: dict[str, Any], note: str) -> dict[str, Any]:
    """An estimate from each part's (gradient sample passes, product samples): product samples cost their measured
    passes (``costs['product_sample_passes']``) and seconds (``product_sample_s``, else a sample pass's)."""
    per_product = costs.get("product_sample_passes", 1.0)
    passes = {k: g + p * per_product for k, (g, p) in parts.items()}
    seconds = sum(g * costs["sample_pass_s"] + p * costs.get("product_sample_s", costs["sample_pass_s"])
                  for g, p in parts.values())
    return {"sample_passes": sum(passes.values()), "exact": False, "parts": passes, "seconds": seconds,
            "note": note}


def iter_budgets(at: tuple[Any, ...], retrain_passes: int | None) -> Iterator[float]:
    """The checkpoint budgets in sample passes."""
    for b in at:
        yield Budget.parse(b).passes(retrain_passes)


__all__ = ["Accounting", "Budget", "CheckpointInfo", "Checkpoints", "Meter", "PassCounter", "RETRAIN_PASSES_HELP",
           "estimate_from_parts", "iter_budgets", "measure_costs", "output_module", "retraining_passes", "sample_key"]
