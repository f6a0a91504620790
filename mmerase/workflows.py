"""What each CLI command does, as library functions: load, run, write outputs safely with a run record.

The CLI only parses options into these calls; projects can call them directly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .data import DataError, load_dataset
from .distributed import barrier, is_main_process, zero3_wrap
from .editfile import parse_edits
from .prepare import Preparation, PreconditionerConfig, open_preparation, prepare, save_preparation
from .influence import InfluenceEngine, SolverConfig, SolveResult
from .influence.distributed import world
from .influence.plan import resolve
from .memory import PeakMemory, engine_memory_report
from .models import LoadOptions, LoraSettings, load_model
from .options import option
from .record import (OutputExistsError, atomic_output_dir, atomic_output_file, machine, sha256_dir, sha256_file,
                     versions, write_json)
from .training import TrainConfig, finetune

RECORD_NAME = "mmerase_record.json"

BASE_HELP = "base model: a local checkpoint folder, a hub id, or a preset name (tiny-llava, tiny-llama)"


@dataclass
class FinetuneFiles:
    """What `mmerase finetune` reads and writes."""

    base: str = option(None, required=True, help=BASE_HELP)
    data: str = option(None, required=True, help="training data (LLaVA-format JSON or JSONL)")
    out: str = option(None, required=True, help="new adapter folder (must not exist)")


@dataclass
class UnlearnFiles:
    """What `mmerase unlearn` reads and writes."""

    base: str = option(None, required=True, help=BASE_HELP)
    adapter: str = option(None, required=True, help="the trained peft adapter folder (only read)")
    data: str = option(None, required=True, help="the training data the adapter was trained on")
    edits: str = option(None, required=True, help="edits file (JSONL: remove / modify / correct / add)")
    out: str = option(None, required=True, help="new adapter folder (must not exist)")
    prepared: str | None = option(None, help=(
        "preparation folder from `mmerase prepare` for this adapter (or one it descends from), data, curvature and "
        "damping: preconditions the solve (same answer, fewer products)"))
    deepspeed: str | None = option(None, help=(
        "DeepSpeed ZeRO-3 config (JSON): partition the frozen base across the ranks of a torchrun/deepspeed launch "
        "(first-order curvatures: fd-hessian, ggn with --ggn-jvp fd, fisher, sampled-fisher)"))


@dataclass
class PrepareFiles:
    """What `mmerase prepare` reads and writes."""

    base: str = option(None, required=True, help=BASE_HELP)
    adapter: str = option(None, required=True, help="the trained peft adapter folder (only read)")
    data: str = option(None, required=True, help="the training data the adapter was trained on")
    out: str = option(None, required=True, help="new preparation folder (must not exist)")


@dataclass
class GenerateFiles:
    """What `mmerase generate` reads and writes, and how it answers."""

    base: str = option(None, required=True, help=BASE_HELP)
    adapter: str | None = option(None, help="peft adapter folder (default: the base alone)")
    data: str = option(None, required=True, help="questions (LLaVA-format JSON or JSONL)")
    out: str = option(None, required=True, help="answers file (JSONL; must not exist)")
    batch_size: int = option(8, help="prompts per batch")
    max_new_tokens: int = option(16, help="answer length limit")
    progress: bool | None = option(None, help="progress bars (default: only on a terminal)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _refuse_existing(out: str | Path) -> None:
    if Path(out).exists():
        raise OutputExistsError(f"output {out} already exists; choose another --out or remove it")


def _file_info(path: str | Path, n: int | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path)}
    if n is not None:
        info["n"] = n
    return info


def run_finetune(base: str, data: str | Path, out: str | Path, *, train: TrainConfig, lora: LoraSettings,
                 options: LoadOptions) -> dict[str, Any]:
    """Train a fresh LoRA adapter on ``data`` and write it (plus a run record) to ``out``."""
    _refuse_existing(out)
    t0 = time.perf_counter()
    samples = load_dataset(data)
    bundle = load_model(base, lora=lora, options=options)
    t_load = time.perf_counter() - t0
    with atomic_output_dir(out) as tmp:
        result = finetune(bundle, samples, train, output_dir=tmp)
        record = {
            "command": "finetune", "created": _now(), "base": base, "data": _file_info(data, len(samples)),
            "train": asdict(train), "lora": asdict(lora), "load": asdict(options),
            "result": {"epoch_losses": result.epoch_losses, "steps": result.steps},
            "timings": {"load_s": t_load, "train_s": result.seconds, "total_s": time.perf_counter() - t0},
            "versions": versions(), "machine": machine(), "chain": [],
        }
        write_json(tmp / RECORD_NAME, record)
    return record


def read_record(adapter: str | Path) -> dict[str, Any] | None:
    """The run record stored beside an adapter (None for adapters mmerase did not write)."""
    path = Path(adapter) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: unreadable run record: {e}") from None


@dataclass
class UnlearnOutcome:
    out: Path
    result: SolveResult
    record: dict[str, Any] = field(default_factory=dict)


def run_unlearn(base: str, adapter: str | Path, data: str | Path, edits: str | Path, out: str | Path, *,
                solver: SolverConfig, options: LoadOptions, deepspeed_config: str | Path | None = None,
                memory_report: bool = True, prepared: str | Path | None = None,
                cache_features: bool = True) -> UnlearnOutcome:
    """base + adapter + training data + edits file → a new adapter folder ``out`` with its run record.

    The input adapter and data are only read. ``out`` appears only when everything was written.

    Under torch.distributed (the process group already initialised, e.g. by the CLI under torchrun) every rank
    runs this with the same arguments: the solve is data-parallel, rank 0 alone writes ``out`` and the others wait
    for it at a barrier. ``deepspeed_config`` (a ZeRO-3 JSON file) partitions the frozen base across the ranks
    (first-order curvatures only). ``memory_report`` adds the peak memory of one training step, one product and
    the whole solve (rank 0's, per process) to the record.

    ``prepared`` (a folder from :func:`run_prepare`) preconditions the solve: same δ to the tolerance, fewer products;
    it is refused if made for another adapter (unless this one descends from it), dataset, curvature or damping.
    ``cache_features`` computes frozen image features once instead of in every product (exact; LLaVA only).
    """
    _refuse_existing(out)
    t0 = time.perf_counter()
    train = load_dataset(data)
    requests = parse_edits(edits, train)
    previous = read_record(adapter)
    preparation, prep_notes = open_preparation(prepared, adapter=adapter, data=data, solver=solver,
                                               adapter_record=previous) if prepared else (None, [])
    plan = resolve(solver, preparation_damping=preparation.damping if preparation else None,
                   zero3=deepspeed_config is not None)
    if plan.damping_source == "preparation":
        prep_notes.append(f"damping 'auto' uses the preparation's λ = {plan.damping:g}")
    bundle = load_model(base, adapter=adapter, options=dataclasses.replace(
        options, exact_hvp=plan.needs_double_backward))
    t_load = time.perf_counter() - t0
    model, distributed = bundle.model, {"world_size": world()[1], "zero3": None}
    if deepspeed_config is not None:
        check_uniform_modality(train, [r.edit for r in requests], data)
        zero = zero3_wrap(bundle.model, deepspeed_config)
        model = zero.module
        distributed["zero3"] = {"config": str(deepspeed_config), "zero_optimization": zero.config["zero_optimization"]}
    cache = bundle.feature_cache() if cache_features and deepspeed_config is None else None
    engine = InfluenceEngine(model, bundle.loss_fn if cache is None else cache.loss_fn, train,
                             collate_fn=bundle.collate if cache is None else cache.collate)
    memory = engine_memory_report(engine, plan) if memory_report else {}
    with PeakMemory(engine.device) as solve_memory:
        result = engine.solve([r.edit for r in requests], plan,
                              preconditioner=preparation.preconditioner if preparation else None)
    memory["solve"] = solve_memory.result
    engine.apply(result.delta)
    t_solve = time.perf_counter() - t0 - t_load
    adapter_sha = sha256_dir(adapter)
    request = {"edits": _file_info(edits, len(requests)), "ops": dict(Counter(r.record["op"] for r in requests)),
               "ids": [r.record.get("id", r.record.get("sample", {}).get("id")) for r in requests],
               "created": _now(), "adapter_sha256": adapter_sha}
    record = {
        "command": "unlearn", "created": request["created"], "base": base,
        "adapter": {"path": str(adapter), "sha256": adapter_sha},
        "data": _file_info(data, len(train)), "edits": request["edits"], "ops": request["ops"],
        "solver": plan.config.to_dict(), "plan": plan.describe(), "result": result.summary(),
        "load": asdict(bundle.options),
        "damping": {"requested": solver.damping, "used": result.config.get("damping", solver.damping),
                    "estimate": result.info.get("damping")},
        "timings": {"load_s": t_load, "solve_s": t_solve},
        "versions": versions(), "machine": machine(), "distributed": distributed, "memory": memory,
        "chain": (previous or {}).get("chain", []) + [request],
        "prepared": None if preparation is None else {
            "path": str(prepared), "kind": preparation.record.get("kind"), "notes": prep_notes,
            "made_for_adapter": (preparation.record.get("adapter") or {}).get("sha256")},
        "feature_cache": None if cache is None else {"level": cache.level, "images": cache.n_images,
                                                      "hits": cache.hits, "misses": cache.misses},
    }
    record["timings"]["total_s"] = time.perf_counter() - t0
    if is_main_process():  # every rank holds the same adapter; one writes it
        with atomic_output_dir(out) as tmp:
            bundle.save_adapter(tmp)
            record["timings"]["total_s"] = time.perf_counter() - t0
            write_json(tmp / RECORD_NAME, record)
    barrier()
    return UnlearnOutcome(Path(out), result, record)


def run_prepare(base: str, adapter: str | Path, data: str | Path, out: str | Path, *, solver: SolverConfig,
                config: PreconditionerConfig | None = None, options: LoadOptions,
                cache_features: bool = True) -> Preparation:
    """Build once what later requests against ``adapter`` and ``data`` reuse (a preconditioner for
    ``solver.curvature`` + ``solver.damping``) and write it to the new folder ``out``."""
    _refuse_existing(out)
    t0 = time.perf_counter()
    train = load_dataset(data)
    plan = resolve(solver)
    bundle = load_model(base, adapter=adapter, options=dataclasses.replace(
        options, exact_hvp=plan.needs_double_backward))
    t_load = time.perf_counter() - t0
    cache = bundle.feature_cache() if cache_features else None
    engine = InfluenceEngine(bundle.model, bundle.loss_fn if cache is None else cache.loss_fn, train,
                             collate_fn=bundle.collate if cache is None else cache.collate)
    prep = prepare(engine, plan, config, adapter_sha256=sha256_dir(adapter), data_sha256=sha256_file(data),
                   extra={"command": "prepare", "base": base, "adapter": {"path": str(adapter)},
                          "data": {"path": str(data)}, "solver": plan.config.to_dict(),
                          "load": asdict(bundle.options)})
    prep.record["timings"] = {"load_s": t_load, "prepare_s": time.perf_counter() - t0 - t_load}
    save_preparation(prep, out)
    return prep


def check_uniform_modality(train: list, edits: list, data: str | Path) -> None:
    """ZeRO-3 gathers each layer collectively, so every rank must run the same modules on every pass: a set that
    mixes image and text-only samples would hang the ranks instead of failing. Refuse it up front."""
    samples = list(train) + [s for e in edits for s in (e.old, e.new) if s is not None]
    kinds = {bool(getattr(s, "has_image", False)) for s in samples}
    if len(kinds) > 1:
        n_img = sum(bool(getattr(s, "has_image", False)) for s in samples)
        raise DataError(f"{data}: under --deepspeed (ZeRO-3) every sample must have an image or none may "
                        f"({n_img} of {len(samples)} training/edited samples have one); split the data or run "
                        "without --deepspeed")


def run_generate(base: str, adapter: str | Path | None, data: str | Path, out: str | Path, *, options: LoadOptions,
                 batch_size: int = 8, max_new_tokens: int = 16, progress: bool | None = None) -> dict[str, Any]:
    """Greedy answers for every record of ``data`` (LLaVA format; the last user turn is asked) → JSONL ``out``."""
    if Path(out).exists():
        raise OutputExistsError(f"output file {out} already exists; choose another --out or remove it")
    t0 = time.perf_counter()
    samples = load_dataset(data)
    bundle = load_model(base, adapter=adapter, options=options)
    answers = bundle.generate(samples, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    with atomic_output_file(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for s, a in zip(samples, answers):
                f.write(json.dumps({"id": s.id, "answer": a}, ensure_ascii=False) + "\n")
    return {"out": str(out), "n": len(samples), "seconds": time.perf_counter() - t0}


def score_adapters(base: str, adapters: dict[str, str | Path | None], splits: dict[str, str | Path], *,
                   options: LoadOptions, generate: bool = True, batch_size: int = 8,
                   max_new_tokens: int = 32) -> dict[str, list[dict[str, Any]]]:
    """Per-sample records for the evaluation harness: for each adapter (None: the base alone) and each split
    (a LLaVA-format data file), every sample's loss L(z), greedy answer and reference (its last assistant turn).

    Returns ``{adapter_name: [{"id", "split", "loss", "prediction", "reference"}, ...]}``, the input of
    ``eval.unlearning.evaluate_unlearning``.
    """
    data = {split: load_dataset(path) for split, path in splits.items()}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, adapter in adapters.items():
        bundle = load_model(base, adapter=adapter, options=options)
        records: list[dict[str, Any]] = []
        for split, samples in data.items():
            losses = bundle.per_sample_losses(samples, batch_size=batch_size).tolist()
            answers = bundle.generate(samples, max_new_tokens=max_new_tokens, batch_size=batch_size) if generate \
                else [None] * len(samples)
            records += [{"id": s.id, "split": split, "loss": loss, "prediction": a, "reference": s.response}
                        for s, loss, a in zip(samples, losses, answers)]
        out[name] = records
    return out
