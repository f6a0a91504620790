"""Running one solve on several processes: the process group from the launcher, rank-0 outputs, DeepSpeed ZeRO-3.

Launch the same command with ``torchrun --nproc_per_node=N $(which mmerase) unlearn ...`` (or ``deepspeed``, or
``torchrun -m mmerase``). Every rank loads the model and takes its share of each mini-batch; the influence engine
all-reduces products, gradients and residuals (:mod:`mmerase.influence.distributed`), so all ranks hold the same δ
and rank 0 alone writes the output while the others wait at a barrier. With a DeepSpeed config (``--deepspeed
ds.json``) the frozen base is partitioned by ZeRO-3 across the ranks (first-order curvatures only; the adapter stays
whole on every rank).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .influence.distributed import is_zero3, world
from .influence.errors import InfluenceError


class DistributedSetupError(InfluenceError):
    """The launcher's environment or the DeepSpeed config cannot be used as given."""


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, local rank, backend, and whether we created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    created: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "backend": self.backend}


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun/deepspeed (1 when not launched by one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedSetupError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from the launcher's environment (``env://``), once.

    A no-op (world size 1) when the process was not started by a launcher. ``backend=None`` picks nccl when CUDA is
    available (each rank then uses ``cuda:LOCAL_RANK``) and gloo otherwise.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, size = world()
        return DistInfo(rank, size, int(os.environ.get("LOCAL_RANK", "0")), torch.distributed.get_backend(), False)
    size = launched_world_size()
    if size <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set: start mmerase with torchrun or deepspeed "
            "(e.g. `torchrun --nproc_per_node=2 $(which mmerase) unlearn ...`), which set them")
    if not torch.distributed.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed; run on one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} "
                                        "GPU(s): start at most one process per GPU")
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    rank, size = world()
    return DistInfo(rank, size, local_rank, backend, True)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    if info.created and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main_process() -> bool:
    return world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if world()[1] > 1:
        torch.distributed.barrier()


def read_deepspeed_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config as a dict, checked for what mmerase needs: ZeRO stage 3 and no fp16/bf16 casting."""
    if isinstance(config, dict):
        cfg, where = json.loads(json.dumps(config)), "the DeepSpeed config"
    else:
        where = f"DeepSpeed config {config}"
        try:
            cfg = json.loads(Path(config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DistributedSetupError(f"{where} not found") from None
        except json.JSONDecodeError as e:
            raise DistributedSetupError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise DistributedSetupError(f"{where} must be a JSON object")
    stage = (cfg.get("zero_optimization") or {}).get("stage")
    if stage != 3:
        raise DistributedSetupError(
            f"{where} has zero_optimization.stage={stage!r}: mmerase uses DeepSpeed only to shard the frozen base "
            "(stage 3); for data parallelism alone launch with torchrun and no --deepspeed")
    for key in ("fp16", "bf16"):
        if (cfg.get(key) or {}).get("enabled"):
            raise DistributedSetupError(
                f"{where} enables {key}: DeepSpeed would cast the whole model, adapter included, to half precision. "
                f"Remove the '{key}' section and choose the base's dtype with --dtype (the adapter stays float32)")
    if "optimizer" in cfg:
        raise DistributedSetupError(f"{where} names an optimizer: the influence solve trains nothing; remove it")
    cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    cfg.setdefault("gradient_accumulation_steps", 1)
    return cfg


@dataclass
class Zero3Model:
    """A model partitioned by :func:`zero3_wrap`: ``module`` is the model to hand to the influence engine (its own
    hooks gather each layer's shards; DeepSpeed's engine forward would refuse ``torch.autograd.grad``), ``engine``
    the DeepSpeed engine that must stay alive with it, ``config`` the DeepSpeed config used."""

    module: nn.Module
    engine: Any
    config: dict[str, Any]


def _trainable_only_children(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of the largest submodules whose parameters are all trainable (LoRA's ``lora_A``/``lora_B``,
    peft's ``modules_to_save``): the parts ZeRO-3 must not partition."""
    found: list[tuple[nn.Module, str]] = []

    def visit(module: nn.Module) -> None:
        for name, child in module.named_children():
            params = list(child.parameters())
            if params and all(p.requires_grad for p in params):
                found.append((module, name))
            else:
                visit(child)

    visit(model)
    return found


def _skip_cpu_shm_op(deepspeed: Any) -> None:
    """On CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce kernel the first time it starts
    (a C++ build of a minute or more, needing a compiler); mmerase's collectives go through torch.distributed and
    never use it, so mark it unavailable."""
    try:
        if deepspeed.accelerator.get_accelerator().device_name() == "cpu":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # a DeepSpeed without this op or accelerator API: nothing to skip
        pass


def _stand_in(module: nn.Module) -> nn.Module:
    """A parameter-free module with the same container shape (peft looks adapters up by key while DeepSpeed walks
    the model)."""
    if isinstance(module, nn.ModuleDict):
        return nn.ModuleDict({k: _stand_in(v) for k, v in module.items()})
    return nn.Identity()


def zero3_wrap(model: nn.Module, config: str | Path | dict[str, Any]) -> Zero3Model:
    """Partition ``model``'s frozen base with DeepSpeed ZeRO-3; the trainable parameters stay whole on every rank.

    The submodules that hold only trainable parameters (the adapter) are swapped for parameter-free stand-ins
    while DeepSpeed converts the model and put back afterwards, so they stay ordinary tensors that DeepSpeed never releases or re-gathers
    (a ZeRO parameter is re-filled from its shards at every gather, which would undo the engine's in-place
    perturbations and updates). Trainable parameters outside such submodules are an error. Needs an initialised
    process group (:func:`init_from_env`). Only first-order curvatures work under ZeRO-3 (see
    :func:`mmerase.influence.distributed.check_product_support`), and every rank must run the same modules in the
    same order: for a LLaVA model, either every training sample has an image or none has.
    """
    try:
        import deepspeed
    except ImportError as e:
        raise DistributedSetupError(
            "--deepspeed needs the deepspeed package: pip install 'mmerase[distributed]' "
            f"(DS_BUILD_OPS=0 is enough; no compiled ops are used) ({e})") from None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise DistributedSetupError("ZeRO-3 needs a process group: launch with torchrun or deepspeed "
                                    "(or call mmerase.distributed.init_from_env() first)")
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise DistributedSetupError("a 4-bit (NF4) base cannot be partitioned by ZeRO-3 (its packed weights are not "
                                    "ordinary tensors): use either --load-in-4bit or --deepspeed, not both")
    cfg = read_deepspeed_config(config)
    _skip_cpu_shm_op(deepspeed)
    detached = _trainable_only_children(model)
    saved = {id(parent): (parent, list(parent._modules.items())) for parent, _ in detached}
    for parent, name in detached:
        parent._modules[name] = _stand_in(parent._modules[name])
    try:
        loose = [n for n, p in model.named_parameters() if p.requires_grad]
        if loose:
            raise DistributedSetupError(
                f"trainable parameter {loose[0]} sits in a module that also holds frozen weights, so ZeRO-3 would "
                "partition it; under ZeRO-3 only adapters in their own modules (LoRA, peft modules_to_save) work")
        engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                          model_parameters=[p for p in model.parameters()])
    finally:
        for parent, items in saved.values():
            parent._modules.clear()
            parent._modules.update(items)
    return Zero3Model(engine.module, engine, cfg)


__all__ = ["DistInfo", "DistributedSetupError", "Zero3Model", "barrier", "init_from_env", "is_main_process", "is_zero3",
           "launched_world_size", "read_deepspeed_config", "shutdown", "zero3_wrap"]
