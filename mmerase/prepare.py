"""Preparations: the curvature work that every later deletion request against one adapter and training set reuses.

``mmerase prepare`` builds a preconditioner M ≈ (H + λI)⁻¹ once (see :mod:`mmerase.influence.precondition`) and
saves it with what it was made for: the adapter (hash), the training data (hash), the curvature and the damping.
``mmerase unlearn --prepared DIR`` then runs preconditioned CG: the same exact products and stopping rule as a
cold solve (same δ to the tolerance) in far fewer products.

A preparation folder holds ``preparation.json`` (the record) and ``preconditioner.safetensors`` (the tensors).
:func:`check_preparation` refuses a preparation made for another adapter, dataset, curvature or damping, naming
what differs; an adapter that *descends* from the prepared one (its run record chain passes through it, i.e. it
absorbed earlier requests) is accepted with a note, because a slightly stale preconditioner still gives the exact
answer, only in a few more steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .influence import InfluenceEngine, InfluenceError, SolverConfig
from .influence.plan import SolvePlan, resolve
from .influence.precondition import (Preconditioner, PreconditionerConfig, build_preconditioner,
                                     preconditioner_from_state)
from .record import atomic_output_dir, machine, sha256_dir, sha256_file, versions, write_json

RECORD_FILE = "preparation.json"
TENSOR_FILE = "preconditioner.safetensors"
FORMAT = 1


class PreparationError(InfluenceError):
    """A preparation folder cannot be read, or was made for another adapter, dataset, curvature or damping."""


@dataclass
class Preparation:
    """A loaded (or freshly built) preparation: the preconditioner and the record of what it was made for."""

    preconditioner: Preconditioner
    record: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def damping(self) -> float:
        return float(self.record["damping"])

    @property
    def curvature(self) -> str:
        return str(self.record["curvature"])


def prepare(engine: InfluenceEngine, solver: SolverConfig | SolvePlan, config: PreconditionerConfig | None = None,
            *, adapter_sha256: str | None = None, data_sha256: str | None = None,
            extra: dict[str, Any] | None = None) -> Preparation:
    """Build a preparation for ``engine`` at its current parameters, for the solver's curvature and damping
    (damping='auto' is estimated here and the value stored; later 'auto' requests reuse it).
    The hashes identify the adapter and data it is made for (``None``: unchecked later)."""
    plan = solver if isinstance(solver, SolvePlan) else resolve(solver)
    solver = plan.config
    config = config or PreconditionerConfig(batch_size=solver.batch_size, seed=solver.seed, progress=solver.progress)
    damping, damping_info = engine.damping_for(plan)
    pre = build_preconditioner(engine, plan.curvature, damping, config)
    record = {
        "format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": pre.kind, "curvature": solver.curvature, "damping": damping,
        "adapter": {"sha256": adapter_sha256}, "data": {"sha256": data_sha256, "n": engine.n},
        "preconditioner": pre.info(), "build": {k: v for k, v in pre.meta.items() if k != "config"},
        "config": config.to_dict(), "versions": versions(), "machine": machine(),
        "damping_estimate": damping_info,
    }
    for key, value in (extra or {}).items():
        record[key] = {**record.get(key, {}), **value} if isinstance(value, dict) else value
    return Preparation(pre, record)


def save_preparation(prep: Preparation, out: str | Path) -> Path:
    """Write ``prep`` to the new folder ``out`` (safetensors + JSON; nothing appears unless both are written)."""
    from safetensors.torch import save_file

    with atomic_output_dir(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in prep.preconditioner.state().items()},
                  str(tmp / TENSOR_FILE))
        write_json(tmp / RECORD_FILE, prep.record)
    prep.path = Path(out)
    return Path(out)


def load_preparation(path: str | Path) -> Preparation:
    """Read a preparation folder written by :func:`save_preparation` (or ``mmerase prepare``)."""
    from safetensors.torch import load_file

    path = Path(path)
    record_file, tensor_file = path / RECORD_FILE, path / TENSOR_FILE
    if not record_file.is_file() or not tensor_file.is_file():
        raise PreparationError(f"{path} is not a preparation folder (needs {RECORD_FILE} and {TENSOR_FILE}; "
                               "make one with `mmerase prepare`)")
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PreparationError(f"{record_file}: unreadable preparation record: {e}") from None
    if record.get("format") != FORMAT:
        raise PreparationError(f"{record_file}: preparation format {record.get('format')!r}, this mmerase reads "
                               f"format {FORMAT}; prepare again")
    tensors = load_file(str(tensor_file))
    return Preparation(preconditioner_from_state(tensors, record["preconditioner"]), record, path)


def _short(h: str | None) -> str:
    return "unknown" if not h else h[:12]


def check_preparation(prep: Preparation, *, adapter_sha256: str | None, data_sha256: str | None,
                      solver: SolverConfig, adapter_record: dict[str, Any] | None = None,
                      adapter_name: str = "the adapter", data_name: str = "the data") -> list[str]:
    """Refuse (raise :class:`PreparationError` naming what differs) a preparation made for another adapter,
    dataset, curvature or damping. Returns notes, e.g. that the adapter descends from the prepared one.

    ``adapter_record`` is the adapter's run record (its ``chain`` lists the requests it absorbed, each with the
    hash of the adapter it was applied to); a ``None`` hash is not checked.
    """
    where = f"preparation {prep.path}" if prep.path else "the preparation"
    rec = prep.record
    if rec.get("curvature") != solver.curvature:
        raise PreparationError(f"{where} was made for curvature '{rec.get('curvature')}', this request uses "
                               f"'{solver.curvature}'; pass --curvature {rec.get('curvature')} or prepare again")
    made_damping = float(rec.get("damping", float("nan")))
    if not solver.auto_damping and not math.isclose(made_damping, solver.damping, rel_tol=1e-9, abs_tol=0.0):
        raise PreparationError(f"{where} was made for damping {made_damping:g}, this request uses "
                               f"{solver.damping:g}; pass --damping {made_damping:g} or prepare again")
    made_data = (rec.get("data") or {}).get("sha256")
    if made_data and data_sha256 and made_data != data_sha256:
        raise PreparationError(f"{where} was made for another training set (data sha256 {_short(made_data)}), "
                               f"{data_name} has sha256 {_short(data_sha256)}; prepare again for this data")
    notes: list[str] = []
    made_adapter = (rec.get("adapter") or {}).get("sha256")
    if made_adapter and adapter_sha256 and made_adapter != adapter_sha256:
        record = adapter_record or {}
        chain = record.get("chain") or []
        # request i of the chain was applied to the adapter with hash chain[i]["adapter_sha256"]
        back = {e.get("adapter_sha256"): len(chain) - i for i, e in enumerate(chain)}
        parent = (record.get("adapter") or {}).get("sha256") if record.get("command") == "unlearn" else None
        back.setdefault(parent, 1)  # records written before chain entries carried hashes
        if made_adapter not in back:
            raise PreparationError(
                f"{where} was made for another adapter (sha256 {_short(made_adapter)}); {adapter_name} has sha256 "
                f"{_short(adapter_sha256)} and does not descend from it (its run record chain has {len(chain)} "
                "request(s), none applied to the prepared adapter); prepare again for this adapter")
        back = back[made_adapter]
        notes.append(f"the preparation was made for an ancestor adapter (sha256 {_short(made_adapter)}, {back} "
                     "request(s) ago): it serves as a preconditioner only, so the answer is still exact but may "
                     "take more steps; prepare again when requests slow down")
    return notes


def open_preparation(path: str | Path, *, adapter: str | Path, data: str | Path, solver: SolverConfig,
                     adapter_record: dict[str, Any] | None = None) -> tuple[Preparation, list[str]]:
    """Load the preparation at ``path`` and check it against the adapter folder and data file a request uses
    (hashes computed here); returns it with the notes of :func:`check_preparation`."""
    prep = load_preparation(path)
    notes = check_preparation(prep, adapter_sha256=sha256_dir(adapter), data_sha256=sha256_file(data), solver=solver,
                              adapter_record=adapter_record, adapter_name=f"adapter {adapter}",
                              data_name=f"data {data}")
    return prep, notes


__all__ = ["Preparation", "PreparationError", "PreconditionerConfig", "check_preparation", "load_preparation",
           "open_preparation", "prepare", "save_preparation"]
