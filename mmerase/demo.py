"""``mmerase demo``: unlearn corrupted image-text pairs from a tiny LLaVA on real handwritten digits (CPU or GPU).

For each scenario of :mod:`mmerase.scenarios` (rc: corrected answers, qm: replaced images, ir: removed pairs), the
corrupted adapter, an adapter retrained from scratch on the edited data, and the mmerase-unlearned adapter (made
through the same workflow as ``mmerase unlearn``, from files on disk) are compared on held-out digits and on the
edited samples. The demo writes its data, edits files, adapters, ``report.md``, ``report.json`` and ``report.png``
to the output folder, and says on stderr what it is doing, one line per stage.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .influence import PreconditionerConfig, SolverConfig
from .options import option
from .record import atomic_output_dir, machine, versions, write_json
from .demo_report import markdown, plot
from .models import load_model
from .scenarios import (TASK_NAMES, ScenarioConfig, Scenarios, build_scenarios, evaluate_bundle, recoveries,
                        stage)
from .workflows import run_prepare, run_unlearn


#: the unlearning every demo scenario runs: one-step refinement steps with the scenario's preparation, chosen on the
#: validation split among what fits the demo's minutes (benchmarks/README.md, "Recovery against compute")
DEMO_SOLVER = {"method": "prepared", "curvature": "ggn", "damping": "auto", "tol": 1e-2, "batch_size": 128,
               "residual_samples": 64, "refine_steps": 20, "refine_damping": "step", "refine_edit_samples": 0}
PREPARATION_KINDS = ("ekfac", "kfac", "diagonal", "lowrank")


def preparation_settings(kind: str, damping_scale: float, curvature: str = "ggn", seed: int = 0,
                         progress: bool | None = None, damping: float | str = "auto"
                         ) -> tuple[SolverConfig, PreconditionerConfig]:
    """How the demo (and the method comparison, which validated it) builds a preparation: λ = damping_scale × the
    curvature's top eigenvalue from 5 Lanczos products over 64 sampled pairs (or a given number); the preconditioner
    from every pair."""
    solver = SolverConfig(curvature=curvature, damping=damping, damping_scale=damping_scale, damping_steps=5,
                          curvature_samples=64, batch_size=64, seed=seed, progress=progress)
    return solver, PreconditionerConfig(kind=kind, batch_size=64, seed=seed, progress=progress)


@dataclass
class DemoConfig(ScenarioConfig):
    """The scenarios (sizes, recipes, device), the preparation built once per corrupted adapter, and the solver
    every scenario's unlearning runs with (:data:`DEMO_SOLVER` unless given; its seed and progress are the demo's;
    damping 'auto' means the preparation's λ)."""

    preparation: str | None = option("ekfac", choices=PREPARATION_KINDS, help=(
        "build this preparation once per corrupted adapter (`mmerase prepare`, its cost counted in the report) and "
        "unlearn with it; none: a cold solve (then not --solver prepared)"))
    preparation_damping_scale: float = option(3e-3, help=(
        "the preparation's λ as a fraction of the curvature's top eigenvalue"))
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(**DEMO_SOLVER))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.solver = dataclasses.replace(self.solver, seed=self.seed, progress=self.progress)
        if self.preparation is None and self.solver.method == "prepared":
            raise ValueError("the solver 'prepared' answers with a preparation: give --preparation (e.g. ekfac), or "
                             "--solver cg for a cold solve")
        if not self.preparation_damping_scale > 0:
            raise ValueError(f"preparation_damping_scale must be > 0, got {self.preparation_damping_scale}")

    def preparation_configs(self) -> tuple[SolverConfig, PreconditionerConfig]:
        return preparation_settings(self.preparation, self.preparation_damping_scale, self.solver.curvature,
                                    self.seed, self.progress, self.solver.damping)


@dataclass
class DemoFiles:
    """Where `mmerase demo` writes."""

    out: str = option("mmerase-demo", help="output folder for report.md, report.json and plots (must not exist)")


def run_demo(out: str | Path, cfg: DemoConfig | None = None) -> dict[str, Any]:
    """Run the demo scenarios and write everything to ``out`` (which must not exist); returns the report."""
    cfg = cfg or DemoConfig()
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with atomic_output_dir(out) as tmp:
            report = _run(tmp, cfg)
            report["seconds"] = time.perf_counter() - t_start
            write_json(tmp / "report.json", report)
            (tmp / "report.md").write_text(markdown(report), encoding="utf-8")
            plot(report, tmp / "report.png", tmp)
    finally:
        torch.set_num_threads(threads)
    report["out"] = str(out)
    return report


def demo_solver(cfg: DemoConfig) -> SolverConfig:
    """The solver settings every demo scenario uses."""
    return cfg.solver


#: edited samples shown in the report's picture, per scenario
GRID = 4


def _run(root: Path, cfg: DemoConfig) -> dict[str, Any]:
    sc_files = build_scenarios(root, cfg)
    preparations: dict[str, dict[str, Any]] = {}
    scenarios = {task: _scenario(sc_files, task, cfg, preparations) for task in cfg.tasks}
    return {"config": asdict(cfg), "solver": demo_solver(cfg).to_dict(), "scenarios": scenarios,
            "preparations": preparations, "sizes": sc_files.sizes, "versions": versions(), "machine": machine()}


def _prepared(sc_files: Scenarios, task: str, cfg: DemoConfig, done: dict[str, dict[str, Any]]) -> Path | None:
    """The preparation for this scenario's corrupted adapter and training file (built once; RC and IR share it)."""
    if cfg.preparation is None:
        return None
    adapter = sc_files.corrupted(task)
    folder = sc_files.adapters / f"prep-{adapter.name}"
    if adapter.name not in done:
        solver, config = cfg.preparation_configs()
        with stage(f"preparing {adapter.name} ({cfg.preparation}, once for its scenarios)"):
            prep = run_prepare(str(sc_files.base), adapter, sc_files.train_file(task), folder, solver=solver,
                               config=config, options=cfg.load_options())
        done[adapter.name] = {"folder": folder.name, "kind": prep.record["kind"], "damping": prep.damping,
                              "accounting": prep.record.get("accounting"), "seconds": prep.record["timings"]}
    return folder


def _scenario(sc_files: Scenarios, task: str, cfg: DemoConfig, preparations: dict[str, dict[str, Any]]
              ) -> dict[str, Any]:
    """Unlearn one scenario through the workflows (prepare, unlearn), then score the three adapters and ask them
    the grid's samples."""
    prepared = _prepared(sc_files, task, cfg, preparations)
    with stage(f"unlearning {task.upper()} ({TASK_NAMES[task]}, {len(sc_files.bad)} edits)"):
        outcome = run_unlearn(str(sc_files.base), sc_files.corrupted(task), sc_files.train_file(task),
                              sc_files.edits_file(task), sc_files.adapters / f"unlearned-{task}",
                              solver=demo_solver(cfg), options=cfg.load_options(), prepared=prepared,
                              retrain_passes=sc_files.retrain_passes(task, cfg.epochs))
    sets, grid = sc_files.eval_sets(task), _grid(sc_files, task)
    rows, answers = {}, {}
    with stage(f"evaluating the {task.upper()} adapters on {len(sets['test'][0])} held-out digits"):
        for role, path in (("corrupted", sc_files.corrupted(task)), ("retrained", sc_files.retrained(task)),
                           ("mmerase", outcome.out)):
            bundle = load_model(sc_files.base, adapter=path, options=cfg.load_options())
            rows[role] = evaluate_bundle(bundle, sets, cfg.progress)
            answers[role] = bundle.generate([g["sample"] for g in grid], max_new_tokens=8)
    res = outcome.result
    prep = preparations.get(sc_files.corrupted(task).name)
    return {
        "name": TASK_NAMES[task], "n_edits": len(sc_files.bad), "rows": rows,
        "retrain_seconds": sc_files.retrain_seconds(task), "unlearn_seconds": outcome.record["timings"]["solve_s"],
        "cost": _cost(outcome.record["accounting"], prep, sc_files, task, cfg),
        "damping": res.config.get("damping"), "damping_estimate": res.info.get("damping"),
        "residual": res.residual, "converged": res.converged, "solver_steps": res.steps,
        "stationarity_gap": res.info.get("stationarity_gap"),
        "grid": [{k: v for k, v in g.items() if k != "sample"} | {"answers": {r: a[i] for r, a in answers.items()}}
                 for i, g in enumerate(grid)],
        **recoveries(task, rows),
    }


def _cost(acc: dict[str, Any], prep: dict[str, Any] | None, sc_files: Scenarios, task: str, cfg: DemoConfig
          ) -> dict[str, Any]:
    """What unlearning the scenario cost: the request, plus the whole preparation it used (counted in full for
    each scenario that uses it), against this run's retraining."""
    prep_acc = (prep or {}).get("accounting") or {}
    passes = acc["sample_passes"] + prep_acc.get("sample_passes", 0.0)
    cpu = acc["cpu_s"] + prep_acc.get("cpu_s", 0.0)
    retrain_passes, retrain_cpu = sc_files.retrain_passes(task, cfg.epochs), sc_files.retrain_cpu_seconds(task)
    return {"sample_passes": passes, "retraining_fraction": passes / retrain_passes, "cpu_s": cpu,
            "retrain_cpu_s": retrain_cpu, "cpu_fraction": cpu / retrain_cpu if retrain_cpu else None,
            "request": {"sample_passes": acc["sample_passes"], "cpu_s": acc["cpu_s"]},
            "preparation": {k: prep_acc.get(k) for k in ("sample_passes", "cpu_s")} if prep_acc else None}


def _grid(sc_files: Scenarios, task: str) -> list[dict[str, Any]]:
    """A few edited samples: the one to ask (the corrected pair; for IR the removed pair), its image file, the
    answer the corrupted adapter was trained on and the true one."""
    out = []
    for k, sample_id in list(zip(sc_files.bad, sc_files.bad_ids))[:GRID]:
        clean, trained = sc_files.clean[k], sc_files.corrupted_rc[k]
        asked = trained if task == "ir" else clean
        image = f"images/wrong-{sample_id}.png" if task == "qm" else f"images/{sample_id}.png"
        out.append({"id": sample_id, "sample": asked, "image": image, "asked_image": f"images/{sample_id}.png",
                    "trained_answer": clean.response if task == "qm" else trained.response,
                    "true_answer": clean.response})
    return out


