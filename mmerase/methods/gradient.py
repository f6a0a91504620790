"""What the gradient-based methods (finetune and the ascent family) share: their optimiser settings, the sample sets
of a request, seeded batch streams, the budget → steps plan, and the run through the one training loop
(:func:`mmerase.training.train_steps`).

A method says which streams it draws a batch from at every step (:class:`Stream`: the forgotten old versions F,
their new versions N, the retained samples R, or the edited training set) and which loss terms it builds from
those batches; a step costs each trained stream's batch size in sample passes (a forward and a backward per
sample) plus a third of each reference-only batch (a forward). The steps that fit the budget, after any up-front
work, are planned before the first one, so every process stops at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..training import PassSampler, TrainConfig, sharded_terms, train_steps
from ..options import option
from .accounting import Checkpoints, CheckpointInfo, iter_budgets
from .base import Job, Method, MethodError, MethodOutput

SCHEDULES = ("constant", "linear", "cosine")
#: the most steps a budget may plan (a guard against a budget typed in the wrong unit)
MAX_STEPS = 1_000_000


@dataclass
class GradientConfig:
    """Optimiser settings shared by the gradient methods (AdamW, as the fine-tune uses). Flags carry a ``method-``
    prefix: ``--lr``, ``--batch-size``, ``--seed`` are the influence solver's."""

    lr: float = option(1e-4, flag="--method-lr", help="AdamW learning rate of the gradient methods")
    batch_size: int = option(8, flag="--method-batch-size", help=(
        "samples per step in each of the method's batches (forget, new, retain, or edited training set)"))
    seed: int = option(0, flag="--method-seed", help="seed of the gradient methods' batch order and dropout")
    schedule: str = option("constant", flag="--method-schedule", choices=SCHEDULES, help=(
        "learning-rate schedule over the steps the budget allows (constant: a checkpoint at a smaller budget equals "
        "a run with that budget)"))
    warmup_steps: int = option(0, flag="--method-warmup-steps", help="linear warm-up steps")
    weight_decay: float = option(0.0, flag="--method-weight-decay", help="AdamW (decoupled) weight decay")
    max_grad_norm: float | None = option(1.0, flag="--method-max-grad-norm", help=(
        "clip each step's gradient norm to this (none: no clipping)"))
    l2: float = option(0.0, cli=False, help="add (l2/2)‖θ‖² to the objective")
    betas: tuple[float, float] = option((0.9, 0.999), cli=False, help="AdamW betas")
    shuffle: bool = option(True, cli=False, help="reshuffle each stream every pass")
    progress: bool | None = option(None, help="progress bars (default: only on a terminal)")

    def __post_init__(self) -> None:
        if not (self.lr > 0):
            raise ValueError(f"method lr must be > 0, got {self.lr}")
        if int(self.batch_size) < 1:
            raise ValueError(f"method batch_size must be ≥ 1, got {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{self.schedule}'; choose one of: {', '.join(SCHEDULES)}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0):
            raise ValueError(f"method max_grad_norm must be > 0 or none, got {self.max_grad_norm}")

    @classmethod
    def from_train_config(cls, train: TrainConfig, **changes: Any) -> Any:
        """The same optimiser as a fine-tune recipe (``train``'s epochs are the budget's business)."""
        return cls(lr=train.lr, batch_size=train.batch_size, seed=train.seed, schedule=train.schedule,
                   warmup_steps=train.warmup_steps, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm,
                   l2=train.l2, betas=train.betas, shuffle=train.shuffle, progress=train.progress, **changes)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=1, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           l2=self.l2, betas=self.betas, max_grad_norm=self.max_grad_norm, schedule=self.schedule,
                           warmup_steps=self.warmup_steps, seed=self.seed, shuffle=self.shuffle,
                           progress=self.progress)


def _key(sample: Any) -> Any:
    sid = getattr(sample, "id", None)
    return ("id", sid) if sid is not None else ("object", id(sample))


@dataclass
class EditSets:
    """A request's sample sets: ``forget`` (F, the old versions of removed and edited samples), ``new`` (N, the
    edited samples' new versions), ``added`` (inserted samples), ``retain`` (R, the training samples no edit
    touches) and ``edited`` (the training set with the edits applied, in order: removed samples dropped, edited
    ones replaced in place, added ones appended — what retraining trains on, as ``mmerase.editfile.edited_dataset``
    builds it). Samples are matched by ``id`` when they have one, else by identity."""

    forget: list[Any]
    new: list[Any]
    added: list[Any]
    retain: list[Any]
    edited: list[Any]

    @classmethod
    def split(cls, train: Sequence[Any], edits: Sequence[Any]) -> "EditSets":
        replaced = {_key(e.old): e.new for e in edits if e.old is not None}
        edited = [replaced.get(_key(s), s) for s in train]
        added = [e.new for e in edits if e.old is None]
        return cls(forget=[e.old for e in edits if e.old is not None],
                   new=[e.new for e in edits if e.old is not None and e.new is not None], added=added,
                   retain=[s for s in train if _key(s) not in replaced],
                   edited=[s for s in edited if s is not None] + added)


@dataclass
class Stream:
    """A named sample set drawn in seeded reshuffled batches; ``cost`` is the sample passes one of its samples costs
    per step (1: forward and backward; 1/3 more for a reference forward)."""

    name: str
    samples: list[Any]
    sampler: PassSampler
    cost: float = 1.0

    def size(self, step: int) -> int:
        return self.sampler.size(step)


class GradientMethod(Method):
    """A method that trains the adapter with the one training loop and spends a budget. Subclasses define
    :meth:`streams` and :meth:`terms`, and :meth:`prepare` for up-front work (costing :meth:`upfront_passes`). An
    instance serves one request (:func:`~.registry.get_method` makes a new one each time): up-front results such as
    reference log-probabilities are kept on it."""

    spends_budget: ClassVar[bool] = True

    def streams(self, job: Job, sets: EditSets) -> list[Stream]:
        raise NotImplementedError

    def terms(self, job: Job, batches: dict[str, list[Any]]) -> Iterable[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def prepare(self, job: Job, sets: EditSets) -> None:
        """Up-front work before the steps (e.g. reference log-probabilities), costing :meth:`upfront_passes`."""

    def upfront_passes(self, job: Job, sets: EditSets) -> float:
        return 0.0

    # ---- shared machinery
    @staticmethod
    def stream(job: Job, name: str, samples: list[Any], offset: int, cost: float = 1.0) -> Stream:
        """A stream seeded with the method seed + ``offset`` (each stream its own order)."""
        cfg = job.config
        gen = torch.Generator().manual_seed(int(cfg.seed) + offset)
        return Stream(name, samples, PassSampler(len(samples), min(cfg.batch_size, len(samples)), gen, cfg.shuffle),
                      cost)

    def plan(self, job: Job, streams: list[Stream], upfront: float) -> list[float]:
        """The cumulative sample passes after each step that fits ``job.budget`` (up-front work first)."""
        if job.budget is None:
            raise MethodError(f"method '{self.name}' needs a compute budget: --budget 600 (sample passes) or "
                              "--budget 10% (of one retraining)")
        spent, marks = upfront, []
        while len(marks) < MAX_STEPS:
            step = sum(s.cost * s.size(len(marks)) for s in streams)
            if spent + step > job.budget + 1e-9:
                break
            spent += step
            marks.append(spent)
        if not marks:
            first = upfront + sum(s.cost * s.size(0) for s in streams)
            raise MethodError(f"budget of {job.budget:g} sample passes does not cover one step of '{self.name}' "
                              f"({first:g} sample passes{' with its up-front work' if upfront else ''})")
        if len(marks) == MAX_STEPS:
            raise MethodError(f"budget of {job.budget:g} sample passes plans more than {MAX_STEPS} steps of "
                              f"'{self.name}'; give a smaller budget")
        return marks

    def loss(self, job: Job) -> Callable[[list[Any]], torch.Tensor]:
        """ℓ over a list of samples: the mean per-sample loss of their batch."""
        engine = job.engine
        return lambda part: engine.loss_fn(engine.model, engine.collate(part))

    def run(self, job: Job) -> MethodOutput:
        sets = EditSets.split(job.engine.train_set, job.edits)
        streams = self.streams(job, sets)
        marks = self.plan(job, streams, self.upfront_passes(job, sets))
        self.prepare(job, sets)

        def objective(step: int) -> Iterable[tuple[str, torch.Tensor]]:
            return self.terms(job, {s.name: [s.samples[i] for i in s.sampler.next()] for s in streams})

        on_step = self.checkpointer(job.checkpoints, marks, job.retrain_passes)
        result = train_steps(job.engine.model, objective, len(marks), job.config.train_config(), on_step=on_step,
                             desc=self.name)
        info = {"steps": result.steps, "planned_sample_passes": marks[-1],
                "streams": {s.name: len(s.samples) for s in streams},
                "step_losses": result.step_losses, "step_terms": result.step_terms, "train_s": result.seconds}
        return MethodOutput(info=info)

    def estimate(self, job: Job, costs: dict[str, Any]) -> dict[str, Any]:
        """The exact planned passes (steps are planned before they run) and seconds at the measured rate."""
        sets = EditSets.split(job.engine.train_set, job.edits)
        streams = self.streams(job, sets)
        marks = self.plan(job, streams, self.upfront_passes(job, sets))
        return {"steps": len(marks), "sample_passes": marks[-1], "exact": True,
                "seconds": marks[-1] * costs["sample_pass_s"]}

    @staticmethod
    def checkpointer(spec: Checkpoints | None, marks: list[float], retrain_passes: int | None
                     ) -> Callable[[int, Any], None] | None:
        """The loop's ``on_step`` for ``spec``: every k steps and at the last step within each checkpoint budget."""
        if spec is None:
            return None
        at: dict[int, float] = {}
        for b in iter_budgets(tuple(spec.at), retrain_passes):
            within = sum(1 for m in marks if m <= b + 1e-9)
            if within:
                at[within] = max(at.get(within, 0.0), b)

        def on_step(step: int, _result: Any) -> None:
            if step in at or (spec.every and step % spec.every == 0):
                spec.callback(CheckpointInfo(step, marks[step - 1], at.get(step)))
        return on_step


class AscentMethod(GradientMethod):
    """The ascent family: a forget term on the old versions F (:meth:`forget_terms`), mean ℓ over the new versions N
    (learn the corrected or modified sample), and optionally a retain term on R (:meth:`retain_terms`). Serves
    remove, correct and modify; an added sample has nothing to forget."""

    serves: ClassVar[frozenset[str]] = frozenset({"remove", "modify"})
    #: the stream offsets of the method seed: each set its own order
    FORGET, NEW, RETAIN = 0, 1, 2

    def uses_retain(self, job: Job) -> bool:
        return False

    def retain_cost(self) -> float:
        """Sample passes per retained sample per step (1: forward and backward)."""
        return 1.0

    def streams(self, job: Job, sets: EditSets) -> list[Stream]:
        out = [self.stream(job, "forget", sets.forget, self.FORGET)]
        if sets.new:
            out.append(self.stream(job, "new", sets.new, self.NEW))
        if self.uses_retain(job):
            if not sets.retain:
                raise MethodError(f"method '{self.name}' needs retained samples, but the edits touch every "
                                  "training sample")
            out.append(self.stream(job, "retain", sets.retain, self.RETAIN, self.retain_cost()))
        return out

    def forget_terms(self, job: Job, batch: list[Any]) -> Iterable[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def retain_terms(self, job: Job, batch: list[Any]) -> Iterable[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def terms(self, job: Job, batches: dict[str, list[Any]]) -> Iterable[tuple[str, torch.Tensor]]:
        yield from self.forget_terms(job, batches["forget"])
        if "new" in batches:
            yield from mean_terms("new", batches["new"], self.loss(job))
        if "retain" in batches:
            yield from self.retain_terms(job, batches["retain"])


def mean_terms(name: str, samples: list[Any], fn: Callable[[list[Any]], torch.Tensor], scale: float = 1.0
               ) -> Iterable[tuple[str, torch.Tensor]]:
    """``scale`` × the batch-mean term ``fn(samples)``, split over processes
    (:func:`~mmerase.training.sharded_terms`)."""
    for n, t in sharded_terms(name, samples, fn):
        yield n, t if scale == 1.0 else t * scale


def check_weight(name: str, value: float) -> None:
    if not (value >= 0) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")


__all__ = ["AscentMethod", "EditSets", "GradientConfig", "GradientMethod", "MAX_STEPS", "SCHEDULES", "Stream",
           "check_weight", "mean_terms"]
