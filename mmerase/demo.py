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

from .influence import SolverConfig
from .options import option
from .record import atomic_output_dir, machine, versions, write_json
from .demo_report import markdown, plot
from .models import load_model
from .scenarios import (TASK_NAMES, ScenarioConfig, Scenarios, build_scenarios, evaluate_bundle, recoveries,
                        stage)
from .workflows import run_unlearn


#: the solver settings of every demo scenario, chosen on the validation split (benchmarks/README.md, fidelity)
DEMO_SOLVER = {"curvature": "hessian", "damping": "auto", "damping_scale": 1e-2, "tol": 1e-2, "max_steps": 100,
               "batch_size": 128, "refine_steps": 10, "refine_damping": "step"}


@dataclass
class DemoConfig(ScenarioConfig):
    """The scenarios (sizes, recipes, device) and the solver every scenario's unlearning runs with
    (:data:`DEMO_SOLVER` unless given; its seed and progress are the demo's)."""

    solver: SolverConfig = field(default_factory=lambda: SolverConfig(**DEMO_SOLVER))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.solver = dataclasses.replace(self.solver, seed=self.seed, progress=self.progress)


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
    scenarios = {task: _scenario(sc_files, task, cfg) for task in cfg.tasks}
    return {"config": asdict(cfg), "solver": demo_solver(cfg).to_dict(), "scenarios": scenarios,
            "sizes": sc_files.sizes, "versions": versions(), "machine": machine()}


def _scenario(sc_files: Scenarios, task: str, cfg: DemoConfig) -> dict[str, Any]:
    """Unlearn one scenario through the workflow, then score the three adapters and ask them the grid's samples."""
    with stage(f"unlearning {task.upper()} ({TASK_NAMES[task]}, {len(sc_files.bad)} edits)"):
        outcome = run_unlearn(str(sc_files.base), sc_files.corrupted(task), sc_files.train_file(task),
                              sc_files.edits_file(task), sc_files.adapters / f"unlearned-{task}",
                              solver=demo_solver(cfg), options=cfg.load_options(),
                              retrain_passes=sc_files.retrain_passes(task, cfg.epochs))
    sets, grid = sc_files.eval_sets(task), _grid(sc_files, task)
    rows, answers = {}, {}
    with stage(f"evaluating the {task.upper()} adapters on {len(sets['test'][0])} held-out digits"):
        for role, path in (("corrupted", sc_files.corrupted(task)), ("retrained", sc_files.retrained(task)),
                           ("mmerase", outcome.out)):
            bundle = load_model(sc_files.base, adapter=path, options=cfg.load_options())
            rows[role] = evaluate_bundle(bundle, sets, cfg.progress)
            answers[role] = bundle.generate([g["sample"] for g in grid], max_new_tokens=8)
    res, acc = outcome.result, outcome.record["accounting"]
    retrain_cpu = sc_files.retrain_cpu_seconds(task)
    return {
        "name": TASK_NAMES[task], "n_edits": len(sc_files.bad), "rows": rows,
        "retrain_seconds": sc_files.retrain_seconds(task), "unlearn_seconds": outcome.record["timings"]["solve_s"],
        "cost": {"sample_passes": acc["sample_passes"], "retraining_fraction": acc["retraining_fraction"],
                 "cpu_s": acc["cpu_s"], "retrain_cpu_s": retrain_cpu,
                 "cpu_fraction": acc["cpu_s"] / retrain_cpu if retrain_cpu else None},
        "damping": res.config.get("damping"), "damping_estimate": res.info.get("damping"),
        "residual": res.residual, "converged": res.converged, "solver_steps": res.steps,
        "stationarity_gap": res.info.get("stationarity_gap"),
        "grid": [{k: v for k, v in g.items() if k != "sample"} | {"answers": {r: a[i] for r, a in answers.items()}}
                 for i, g in enumerate(grid)],
        **recoveries(task, rows),
    }


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


