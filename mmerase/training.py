"""The one training loop: fine-tuning, retraining from scratch, and every gradient-based unlearning method.

:func:`train_steps` is an AdamW loop over an *objective*: a callable that, for step k, yields the step's named loss
terms (scalar tensors whose sum is minimised). The loop differentiates each term as it comes (so one term's graph is
freed before the next is built), sums the gradients, all-reduces them under torch.distributed, applies the L2 term
and clipping, and steps. :func:`train` is the fine-tune: one term per step, the mean loss of the next batch of a
:class:`PassSampler` over the samples. :func:`train_adapter` loads a base, attaches a fresh seeded LoRA, trains it
and saves the peft folder — run it on the original data to make θ̂ and on the edited data to get the
exact-retraining reference. Same seed, same data → bit-identical adapter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mmerase.generation import progress_enabled
from mmerase.influence.distributed import all_reduce_, shard, world
from mmerase.options import option


@dataclass
class TrainConfig:
    """AdamW fine-tuning settings. ``schedule``: ``constant``, ``linear`` or ``cosine`` decay to 0 after
    ``warmup_steps``. ``progress=None`` shows a bar only on a terminal.

    ``l2`` adds (l2/2)‖θ‖² to the objective (its gradient l2·θ before clipping), unlike AdamW's decoupled
    ``weight_decay``: trained to convergence, the adapter then solves ∇R(θ) + l2·θ = 0, the regularised problem
    whose influence update is exactly (H + l2·I)δ = b, i.e. damping λ = l2 is the training's own regulariser.
    """

    epochs: int = option(3, help="passes over the data")
    batch_size: int = option(8, help="samples per step")
    lr: float = option(1e-3, help="AdamW learning rate")
    weight_decay: float = option(0.0, help="AdamW (decoupled) weight decay")
    l2: float = option(0.0, help="add (l2/2)‖θ‖² to the loss: trained to convergence, the influence update with "
                       "damping λ = l2 is then exact for this objective")
    betas: tuple[float, float] = option((0.9, 0.999), cli=False, help="AdamW betas")
    max_grad_norm: float | None = option(1.0, help="clip the gradient norm to this (none: no clipping)")
    schedule: str = option("constant", choices=("constant", "linear", "cosine"), help="learning-rate schedule")
    warmup_steps: int = option(0, help="linear warm-up steps before the schedule")
    seed: int = option(0, help="seed of the data order (and dropout)")
    shuffle: bool = option(True, help="reshuffle the data every epoch")
    progress: bool | None = option(None, help="progress bars (default: only on a terminal)")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if int(self.warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if not (0 < self.lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "l2"):
            if not (0 <= getattr(self, name) < float("inf")):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {getattr(self, name)}")
        if self.max_grad_norm is not None and not (0 < self.max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or none, got {self.max_grad_norm}")


@dataclass
class TrainResult:
    """What a run did: loss of every step (the sum of its terms), each step's terms by name, mean loss of every
    epoch (:func:`train` only), steps and wall time."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    adapter_dir: Path | None = None
    step_terms: list[dict[str, float]] = field(default_factory=list)


#: an objective: step index → the step's (name, scalar loss term) pairs; their sum is minimised
Objective = Callable[[int], Iterable[tuple[str, torch.Tensor]]]


def _lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - frac)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {schedule!r}; choose 'constant', 'linear' or 'cosine'")


class PassSampler:
    """Mini-batches of reshuffled passes over ``range(n)``: each pass is a permutation drawn from ``generator`` when
    the pass begins (the identity without ``shuffle``), cut into consecutive batches of ``batch_size`` (the last one
    of a pass shorter). Batch sizes do not depend on the draws, so a step's cost is known before it runs."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True):
        if n < 1 or batch_size < 1:
            raise ValueError(f"a sampler needs n ≥ 1 and batch_size ≥ 1 (got {n}, {batch_size})")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._order: list[int] = []
        self._pos = n  # the first call starts a pass

    def next(self) -> list[int]:
        """The next batch of indices."""
        if self._pos >= self.n:
            self._order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle \
                else list(range(self.n))
            self._pos = 0
        idx = self._order[self._pos: self._pos + self.batch_size]
        self._pos += len(idx)
        return idx

    @property
    def batches_per_pass(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def size(self, step: int) -> int:
        """The size of batch number ``step`` (0-based) of this sampler."""
        k = step % self.batches_per_pass
        return min(self.batch_size, self.n - k * self.batch_size)


def sharded_terms(name: str, samples: Sequence[Any], loss: Callable[[list[Any]], torch.Tensor]
                  ) -> Iterable[tuple[str, torch.Tensor]]:
    """The batch-mean term ``loss(samples)`` as this process's share of it under torch.distributed.

    On one process: ``(name, loss(samples))``. On several, rank r computes ``loss`` on ``samples[r::world]``
    weighted by its share, so the all-reduced gradient is the whole batch's; a rank without samples runs a
    zero-weight pass on the first sample so that every rank makes the same passes (ZeRO-3 needs the lockstep).
    """
    samples = list(samples)
    rank, size = world()
    if size == 1:
        yield name, loss(samples)
        return
    for local, live in shard(range(len(samples)), rank, size):
        weight = len(local) / len(samples) if live else 0.0
        yield name, loss([samples[i] for i in local]) * weight


def _step_gradients(params: list[torch.Tensor], terms: Iterable[tuple[str, torch.Tensor]]
                    ) -> tuple[list[torch.Tensor | None], dict[str, float]]:
    """Σ of the terms' gradients (term by term) and each name's summed value (all-reduced across processes)."""
    grads: list[torch.Tensor | None] = [None] * len(params)
    values: dict[str, float] = {}
    for name, term in terms:
        values[name] = values.get(name, 0.0) + float(term.detach())
        if not term.requires_grad:
            continue
        for i, g in enumerate(torch.autograd.grad(term, params, allow_unused=True)):
            if g is not None:
                grads[i] = g if grads[i] is None else grads[i] + g
    if world()[1] > 1:  # every rank reduces the same tensors; a parameter no rank used keeps no gradient
        used = all_reduce_([torch.tensor([float(g is not None) for g in grads], dtype=torch.float64)])[0]
        idx = [i for i in range(len(params)) if used[i] > 0]
        full = all_reduce_([grads[i] if grads[i] is not None else torch.zeros_like(params[i]) for i in idx])
        for i, g in zip(idx, full):
            grads[i] = g
        names = sorted(values)
        reduced = all_reduce_([torch.tensor([values[k] for k in names], dtype=torch.float64)])[0]
        values = dict(zip(names, reduced.tolist()))
    return grads, values


def train_steps(model: nn.Module, objective: Objective, steps: int, config: TrainConfig,
                on_step: Callable[[int, TrainResult], None] | None = None, desc: str = "train") -> TrainResult:
    """``steps`` AdamW steps on the trainable parameters of ``model``, each on the terms ``objective(step)`` yields.

    The learning rate follows ``config.schedule`` over ``steps``; ``config.l2`` and ``config.max_grad_norm`` act on
    the summed gradient. Deterministic for ``config.seed``: dropout draws are seeded here (the global RNG state is
    restored afterwards; the objective seeds its own batch order). ``on_step(k, result)`` runs after step k
    (1-based) with the model in eval mode and the global RNG state restored afterwards, so an evaluation there does
    not change the run. The model is left in eval mode. A non-finite step loss stops the run with
    ``FloatingPointError``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True): attach an adapter first")
    _lr_factor(config.schedule, 0, 1, 0)  # validate early
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    result = TrainResult()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model.train()
        bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress_enabled(config.progress))
        try:
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = config.lr * _lr_factor(config.schedule, step, steps, config.warmup_steps)
                grads, values = _step_gradients(params, objective(step))
                value = sum(values.values())
                if not math.isfinite(value):
                    raise FloatingPointError(f"training loss became {value} at step {step}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                for p, g in zip(params, grads):
                    p.grad = g
                if config.l2:
                    for p in params:
                        if p.grad is not None:
                            p.grad.add_(p.detach(), alpha=config.l2)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                result.step_losses.append(value)
                result.step_terms.append(values)
                result.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if on_step is not None:
                    _call_outside_training(model, on_step, result)
        finally:
            bar.close()
            model.eval()
    result.seconds = time.perf_counter() - start
    return result


def _call_outside_training(model: nn.Module, fn: Callable[[int, TrainResult], None], result: TrainResult) -> None:
    """``fn(step, result)`` with the model in eval mode and the global RNG untouched, then back to training."""
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            fn(result.steps, result)
    finally:
        model.train()


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], samples: Sequence[Any],
          collate_fn: Callable[[list[Any]], Any], config: TrainConfig | None = None) -> TrainResult:
    """Minimise the mean of ``loss_fn`` over mini-batches of ``samples`` with AdamW on the trainable parameters:
    ``config.epochs`` reshuffled passes (:class:`PassSampler` seeded with ``config.seed``) through
    :func:`train_steps`. Under torch.distributed each process takes its share of every batch."""
    config = config or TrainConfig()
    if not samples:
        raise ValueError("cannot train on an empty sample list")
    if config.batch_size < 1 or config.epochs < 0:
        raise ValueError(f"batch_size must be ≥ 1 and epochs ≥ 0 (got {config.batch_size}, {config.epochs})")
    sampler = PassSampler(len(samples), config.batch_size, torch.Generator().manual_seed(config.seed),
                          config.shuffle)

    def objective(step: int) -> Iterable[tuple[str, torch.Tensor]]:
        chunk = [samples[i] for i in sampler.next()]
        return sharded_terms("loss", chunk, lambda part: loss_fn(model, collate_fn(part)))

    result = train_steps(model, objective, sampler.batches_per_pass * config.epochs, config)
    for e in range(config.epochs):
        total = 0.0
        for k in range(sampler.batches_per_pass):
            total += result.step_losses[e * sampler.batches_per_pass + k] * sampler.size(k)
        result.epoch_losses.append(total / len(samples))
    return result


def finetune(bundle: Any, samples: Sequence[Any], config: TrainConfig | None = None,
             output_dir: str | Path | None = None) -> TrainResult:
    """Train ``bundle``'s adapter on ``samples`` (its collate and loss) and save it to ``output_dir`` if given."""
    result = train(bundle.model, bundle.loss_fn, samples, bundle.collate, config)
    if output_dir is not None:
        result.adapter_dir = bundle.save_adapter(output_dir)
    return result


def train_adapter(base: str | Path, samples: Sequence[Any], config: TrainConfig | None = None, *,
                  lora: Any = None, options: Any = None, output_dir: str | Path | None = None,
                  ) -> tuple[Any, TrainResult]:
    """Load ``base``, attach a fresh LoRA (``lora``, seeded), fine-tune on ``samples``, save to ``output_dir``.

    The one function for both the original fine-tune and "retrain from scratch on the edited data".
    Returns (bundle, result).
    """
    from mmerase.models import LoraSettings, load_model

    bundle = load_model(base, lora=lora or LoraSettings(), options=options)
    return bundle, finetune(bundle, samples, config, output_dir)
