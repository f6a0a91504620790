"""Fine-tuning: produce the adapter the engine later edits, or retrain one from scratch on edited data.

:func:`train` is a plain AdamW loop over any ``model``/``loss_fn``/``collate_fn``; :func:`train_adapter` loads a base,
attaches a fresh seeded LoRA, trains it and saves the peft folder — run it on the original data to make θ̂ and on the
edited data to get the exact-retraining reference. Same seed, same data → bit-identical adapter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mmerase.generation import progress_enabled
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


@dataclass
class TrainResult:
    """What a run did: loss of every step, mean loss of every epoch, steps and wall time."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    adapter_dir: Path | None = None


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


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], samples: Sequence[Any],
          collate_fn: Callable[[list[Any]], Any], config: TrainConfig | None = None) -> TrainResult:
    """Minimise the mean of ``loss_fn`` over mini-batches of ``samples`` with AdamW on the trainable parameters.

    Deterministic for ``config.seed``: the shuffling order and dropout are seeded here (the global RNG state is
    restored afterwards). The model is left in eval mode.
    """
    config = config or TrainConfig()
    if not samples:
        raise ValueError("cannot train on an empty sample list")
    if config.batch_size < 1 or config.epochs < 0:
        raise ValueError(f"batch_size must be ≥ 1 and epochs ≥ 0 (got {config.batch_size}, {config.epochs})")
    _lr_factor(config.schedule, 0, 1, 0)  # validate early
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True): attach an adapter first")
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    n = len(samples)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    result = TrainResult()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        order_gen = torch.Generator().manual_seed(config.seed)
        model.train()
        bar = tqdm(total=total, desc="train", unit="step", disable=not progress_enabled(config.progress))
        try:
            for _epoch in range(config.epochs):
                order = torch.randperm(n, generator=order_gen).tolist() if config.shuffle else list(range(n))
                epoch_total = 0.0
                for s in range(steps_per_epoch):
                    chunk = [samples[i] for i in order[s * config.batch_size:(s + 1) * config.batch_size]]
                    for g in opt.param_groups:
                        g["lr"] = config.lr * _lr_factor(config.schedule, result.steps, total, config.warmup_steps)
                    loss = loss_fn(model, collate_fn(chunk))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss became {loss.item()} at step {result.steps}; "
                                                 "lower the learning rate")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.l2:
                        for p in params:
                            if p.grad is not None:
                                p.grad.add_(p.detach(), alpha=config.l2)
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    opt.step()
                    value = float(loss.detach())
                    result.step_losses.append(value)
                    epoch_total += value * len(chunk)
                    result.steps += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}")
                result.epoch_losses.append(epoch_total / n)
        finally:
            bar.close()
            model.eval()
    result.seconds = time.perf_counter() - start
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
