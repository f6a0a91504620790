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

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .influence import InfluenceEngine, InfluenceError, SolverConfig
from .influence.plan import SolvePlan, resolve
from .fileio import FileFormatError, read_json, shown
from .influence.precondition import (KINDS, Preconditioner, PreconditionerConfig, build_preconditioner,
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
    The hashes identify the adapter and data it is made for (``None``: a later request that has the hash refuses
    the preparation, since it cannot be checked)."""
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
    with atomic_output_dir(out) as tmp:
        write_preparation(prep, tmp)
    prep.path = Path(out)
    return Path(out)


def write_preparation(prep: Preparation, folder: str | Path) -> None:
    """Write ``prep``'s files into the existing (partial) ``folder``: the CLI reserves its output before the work."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in prep.preconditioner.state().items()},
              str(Path(folder) / TENSOR_FILE))
    write_json(Path(folder) / RECORD_FILE, prep.record)


def load_preparation(path: str | Path) -> Preparation:
    """Read a preparation folder written by :func:`save_preparation` (or ``mmerase prepare``).

    Anything that is not such a folder is a :class:`PreparationError` naming the file: a record that is not UTF-8,
    not JSON, has a key twice, nests deeper than :data:`~mmerase.fileio.MAX_NESTING` or lacks what a request checks
    (:func:`check_record`); a tensor file that is truncated or empty; tensors that do not form the recorded kind of
    preconditioner (or hold NaN / inf).
    """
    path = Path(path)
    record_file, tensor_file = path / RECORD_FILE, path / TENSOR_FILE
    if not record_file.exists() or not tensor_file.exists():
        raise PreparationError(f"{path} is not a preparation folder (needs {RECORD_FILE} and {TENSOR_FILE}; "
                               "make one with `mmerase prepare`)")
    try:
        record = read_json(record_file)
    except FileFormatError as e:
        raise PreparationError(f"unreadable preparation record {e}") from None
    check_record(record, record_file)
    pre = _read_preconditioner(tensor_file, record)
    return Preparation(pre, record, path)


def _read_preconditioner(tensor_file: Path, record: dict[str, Any]) -> Preconditioner:
    """The preconditioner saved in ``tensor_file``, of the kind ``record`` (already checked) says."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise PreparationError(f"{tensor_file} is not a readable safetensors file ({_first_line(e)}); the "
                               "preparation is damaged or incompletely copied: prepare again") from None
    kind = record["kind"]
    try:
        pre = preconditioner_from_state(tensors, record["preconditioner"])
        pre.check_state()
    except (InfluenceError, KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise PreparationError(f"{tensor_file} and its {RECORD_FILE} do not form a {kind} preconditioner "
                               f"({type(e).__name__}: {_first_line(e)}); prepare again") from None
    if pre.kind != kind:
        raise PreparationError(f"{tensor_file}: the record says kind {kind}, its preconditioner info builds a "
                               f"{pre.kind} one; prepare again")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise PreparationError(f"{tensor_file}: {len(bad)} of {len(tensors)} tensor(s) hold NaN or inf, the first "
                               f"{shown(bad[0])}; prepare again")
    return pre


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    return shown(text, limit, quote=False)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_record(record: Any, where: str | Path = "the preparation record") -> None:
    """Refuse (:class:`PreparationError` naming ``where``) a preparation record this mmerase cannot trust: another
    format, an unknown preconditioner ``kind`` (or one its ``preconditioner`` info disagrees with), a curvature that
    is not a name, a damping that is not a finite number ≥ 0, adapter / data hashes that are not strings."""
    if not isinstance(record, dict):
        raise PreparationError(f"{where}: expected a JSON object, found a {type(record).__name__}")
    if record.get("format") != FORMAT:
        raise PreparationError(f"{where}: preparation format {shown(record.get('format'))}, this mmerase reads "
                               f"format {FORMAT}; prepare again")
    kind, info = record.get("kind"), record.get("preconditioner")
    if kind not in KINDS:
        raise PreparationError(f"{where}: unknown preconditioner kind {shown(kind)} (this mmerase builds "
                               f"{', '.join(KINDS)}); prepare again")
    if not isinstance(info, dict):
        raise PreparationError(f"{where}: 'preconditioner' must be an object describing the saved tensors, found "
                               f"{shown(info)}; prepare again")
    if info.get("kind") != kind:
        raise PreparationError(f"{where}: the record's kind '{kind}' and its preconditioner's kind "
                               f"{shown(info.get('kind'))} disagree; prepare again")
    if not isinstance(record.get("curvature"), str):
        raise PreparationError(f"{where}: 'curvature' must be a curvature name, found "
                               f"{shown(record.get('curvature'))}; prepare again")
    if not _is_number(record.get("damping")) or record["damping"] < 0:
        raise PreparationError(f"{where}: 'damping' must be a finite number ≥ 0, found "
                               f"{shown(record.get('damping'))}; prepare again")
    for part in ("adapter", "data"):
        entry = record.get(part)
        if entry is not None and not isinstance(entry, dict):
            raise PreparationError(f"{where}: '{part}' must be an object, found {shown(entry)}; prepare again")
        digest = (entry or {}).get("sha256")
        if digest is not None and not isinstance(digest, str):
            raise PreparationError(f"{where}: the {part} sha256 {shown(digest)} is not a hex digest; prepare again")


def _short(h: Any) -> str:
    return "unknown" if not h else shown(str(h)[:12], quote=False)


def _descent(adapter_record: Any) -> tuple[dict[Any, int], int]:
    """{adapter hash: requests ago} of the adapters an adapter's run record says it descends from, and the length
    of its chain; entries that are not what mmerase writes are ignored (the adapter then descends from less)."""
    record = adapter_record if isinstance(adapter_record, dict) else {}
    chain = record.get("chain") if isinstance(record.get("chain"), list) else []
    # request i of the chain was applied to the adapter with hash chain[i]["adapter_sha256"]
    back = {e["adapter_sha256"]: len(chain) - i for i, e in enumerate(chain)
            if isinstance(e, dict) and isinstance(e.get("adapter_sha256"), str)}
    adapter = record.get("adapter") if isinstance(record.get("adapter"), dict) else {}
    parent = adapter.get("sha256") if record.get("command") == "unlearn" else None
    if isinstance(parent, str):
        back.setdefault(parent, 1)  # records written before chain entries carried hashes
    return back, len(chain)


def check_preparation(prep: Preparation, *, adapter_sha256: str | None, data_sha256: str | None,
                      solver: SolverConfig, adapter_record: dict[str, Any] | None = None,
                      adapter_name: str = "the adapter", data_name: str = "the data") -> list[str]:
    """Refuse (raise :class:`PreparationError` naming what differs) a preparation made for another adapter,
    dataset, curvature or damping. Returns notes, e.g. that the adapter descends from the prepared one.

    ``adapter_record`` is the adapter's run record (its ``chain`` lists the requests it absorbed, each with the
    hash of the adapter it was applied to). A request hash of ``None`` is not checked; a preparation that does not
    record the hash a request has is refused (it cannot be checked: prepare again).
    """
    where = f"preparation {prep.path}" if prep.path else "the preparation"
    rec = prep.record
    if rec.get("curvature") != solver.curvature:
        made = rec.get("curvature")
        raise PreparationError(f"{where} was made for curvature {shown(made)}, this request uses "
                               f"'{solver.curvature}'; pass --curvature {shown(made, quote=False)} or prepare again")
    made_damping = rec.get("damping")
    if not _is_number(made_damping):
        raise PreparationError(f"{where}: its damping {shown(made_damping)} is not a finite number; prepare again")
    made_damping = float(made_damping)
    if not solver.auto_damping and not math.isclose(made_damping, solver.damping, rel_tol=1e-9, abs_tol=0.0):
        raise PreparationError(f"{where} was made for damping {made_damping:g}, this request uses "
                               f"{solver.damping:g}; pass --damping {made_damping:g} or prepare again")
    made_data = (rec.get("data") or {}).get("sha256")
    if data_sha256 and not made_data:
        raise PreparationError(f"{where} does not record the training set it was made for (its {RECORD_FILE} "
                               f"lacks the data sha256), so it cannot be checked against {data_name}; prepare again")
    if made_data and data_sha256 and made_data != data_sha256:
        raise PreparationError(f"{where} was made for another training set (data sha256 {_short(made_data)}), "
                               f"{data_name} has sha256 {_short(data_sha256)}; prepare again for this data")
    notes: list[str] = []
    made_adapter = (rec.get("adapter") or {}).get("sha256")
    if adapter_sha256 and not made_adapter:
        raise PreparationError(f"{where} does not record the adapter it was made for (its {RECORD_FILE} lacks the "
                               f"adapter sha256), so it cannot be checked against {adapter_name}; prepare again")
    if made_adapter and adapter_sha256 and made_adapter != adapter_sha256:
        back, steps = _descent(adapter_record)
        if made_adapter not in back:
            raise PreparationError(
                f"{where} was made for another adapter (sha256 {_short(made_adapter)}); {adapter_name} has sha256 "
                f"{_short(adapter_sha256)} and does not descend from it (its run record chain has {steps} "
                "request(s), none applied to the prepared adapter); prepare again for this adapter")
        notes.append(f"the preparation was made for an ancestor adapter (sha256 {_short(made_adapter)}, "
                     f"{back[made_adapter]} request(s) ago): it serves as a preconditioner only, so the answer is "
                     "still exact but may take more steps; prepare again when requests slow down")
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


__all__ = ["Preparation", "PreparationError", "PreconditionerConfig", "check_preparation", "check_record",
           "load_preparation", "open_preparation", "prepare", "save_preparation", "write_preparation"]
