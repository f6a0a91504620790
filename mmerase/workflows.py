"""What each CLI command does, as library functions: load, run, write outputs safely with a run record.

The CLI only parses options into these calls; projects can call them directly.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .data import DataError, load_dataset
from .editfile import parse_edits
from .influence import InfluenceEngine, SolverConfig, SolveResult
from .models import LoadOptions, LoraSettings, load_model
from .record import (OutputExistsError, atomic_output_dir, atomic_output_file, machine, sha256_dir, sha256_file,
                     versions, write_json)
from .training import TrainConfig, finetune

RECORD_NAME = "mmerase_record.json"


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
                solver: SolverConfig, options: LoadOptions) -> UnlearnOutcome:
    """base + adapter + training data + edits file → a new adapter folder ``out`` with its run record.

    The input adapter and data are only read. ``out`` appears only when everything was written.
    """
    _refuse_existing(out)
    t0 = time.perf_counter()
    train = load_dataset(data)
    requests = parse_edits(edits, train)
    bundle = load_model(base, adapter=adapter, options=options)
    t_load = time.perf_counter() - t0
    engine = InfluenceEngine(bundle.model, bundle.loss_fn, train, collate_fn=bundle.collate)
    result = engine.solve([r.edit for r in requests], solver)
    engine.apply(result.delta)
    t_solve = time.perf_counter() - t0 - t_load
    previous = read_record(adapter)
    request = {"edits": _file_info(edits, len(requests)), "ops": dict(Counter(r.record["op"] for r in requests)),
               "ids": [r.record.get("id", r.record.get("sample", {}).get("id")) for r in requests],
               "created": _now()}
    record = {
        "command": "unlearn", "created": request["created"], "base": base,
        "adapter": {"path": str(adapter), "sha256": sha256_dir(adapter)},
        "data": _file_info(data, len(train)), "edits": request["edits"], "ops": request["ops"],
        "solver": solver.to_dict(), "result": result.summary(), "load": asdict(options),
        "timings": {"load_s": t_load, "solve_s": t_solve},
        "versions": versions(), "machine": machine(),
        "chain": (previous or {}).get("chain", []) + [request],
    }
    with atomic_output_dir(out) as tmp:
        bundle.save_adapter(tmp)
        record["timings"]["total_s"] = time.perf_counter() - t0
        write_json(tmp / RECORD_NAME, record)
    return UnlearnOutcome(Path(out), result, record)


def run_generate(base: str, adapter: str | Path | None, data: str | Path, out: str | Path, *, options: LoadOptions,
                 batch_size: int = 8, max_new_tokens: int = 16) -> dict[str, Any]:
    """Greedy answers for every record of ``data`` (LLaVA format; the last user turn is asked) → JSONL ``out``."""
    if Path(out).exists():
        raise OutputExistsError(f"output file {out} already exists; choose another --out or remove it")
    t0 = time.perf_counter()
    samples = load_dataset(data)
    bundle = load_model(base, adapter=adapter, options=options)
    answers = bundle.generate(samples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    with atomic_output_file(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for s, a in zip(samples, answers):
                f.write(json.dumps({"id": s.id, "answer": a}, ensure_ascii=False) + "\n")
    return {"out": str(out), "n": len(samples), "seconds": time.perf_counter() - t0}
