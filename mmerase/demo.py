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
from .scenarios import TASK_NAMES, ScenarioConfig, build_scenarios, evaluate_adapter, recoveries, stage
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
            (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
            _plot(report, tmp / "report.png")
    finally:
        torch.set_num_threads(threads)
    report["out"] = str(out)
    return report


def demo_solver(cfg: DemoConfig) -> SolverConfig:
    """The solver settings every demo scenario uses."""
    return cfg.solver


def _run(root: Path, cfg: DemoConfig) -> dict[str, Any]:
    sc_files = build_scenarios(root, cfg)
    solver = demo_solver(cfg)
    scenarios: dict[str, Any] = {}
    for task in cfg.tasks:
        with stage(f"unlearning {task.upper()} ({TASK_NAMES[task]}, {len(sc_files.bad)} edits)"):
            outcome = run_unlearn(str(sc_files.base), sc_files.corrupted(task), sc_files.train_file(task),
                                  sc_files.edits_file(task), sc_files.adapters / f"unlearned-{task}", solver=solver,
                                  options=cfg.load_options())
        sets = sc_files.eval_sets(task)
        with stage(f"evaluating the {task.upper()} adapters on {len(sets[next(iter(sets))][0])} held-out digits"):
            rows = {role: evaluate_adapter(sc_files.base, path, sets, cfg) for role, path in
                    (("corrupted", sc_files.corrupted(task)), ("retrained", sc_files.retrained(task)),
                     ("mmerase", outcome.out))}
        res = outcome.result
        sc: dict[str, Any] = {
            "name": TASK_NAMES[task], "n_edits": len(sc_files.bad), "rows": rows,
            "retrain_seconds": sc_files.retrain_seconds(task),
            "unlearn_seconds": outcome.record["timings"]["solve_s"],
            "damping": res.config.get("damping"), "damping_estimate": res.info.get("damping"),
            "residual": res.residual, "converged": res.converged, "solver_steps": res.steps,
            "stationarity_gap": res.info.get("stationarity_gap"),
            "residual_history": [(h["step"], h["residual"]) for h in res.history],
            **recoveries(task, rows),
        }
        scenarios[task] = sc
    return {"config": asdict(cfg), "solver": solver.to_dict(), "scenarios": scenarios, "sizes": sc_files.sizes,
            "versions": versions(), "machine": machine()}


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _damping_text(solver: dict[str, Any]) -> str:
    if solver["damping"] == "auto":
        return f"auto ({solver['damping_scale']:g} × the curvature's top eigenvalue)"
    return f"{solver['damping']:g}"


def _markdown(report: dict[str, Any]) -> str:
    s = report["sizes"]
    lines = [
        "# mmerase demo: unlearning corrupted image-text pairs (tiny LLaVA, scikit-learn digits)", "",
        f"{s['train']} training pairs, {s['edits']} corrupted ({100 * report['config']['corruption']:.0f}%), "
        f"{s['test']} held-out digits; base pre-trained on {s['pretrain']} other digits. "
        f"Solver: {report['solver']['method']}, curvature {report['solver']['curvature']}, "
        f"damping {_damping_text(report['solver'])}, refinement steps {report['solver']['refine_steps']}"
        + (f" ({report['solver'].get('refine_damping')}-damped)" if report['solver']['refine_steps'] else "") + ".", "",
    ]
    for task, sc in report["scenarios"].items():
        rows = sc["rows"]
        edited = "forget" if task == "ir" else "edited"
        lines += [f"## {task.upper()}: {sc['name']} ({sc['n_edits']} edits)", "",
                  f"| adapter | test accuracy | {edited}-set accuracy | {edited}-set loss |", "|---|---|---|---|"]
        for role in ("retrained", "corrupted", "mmerase"):
            r = rows[role]
            lines.append(f"| {role} | {_fmt(r['test_acc'], True)} | {_fmt(r[f'{edited}_acc'], True)} | "
                         f"{_fmt(r[f'{edited}_loss'])} |")
        lines += ["", f"- recovery of the test-accuracy gap: {_fmt(sc['recovery_test_acc'])}"]
        if task == "ir":
            lines.append(f"- forget-set loss vs retrained: {100 * sc['forget_loss_rel_diff']:.1f}% apart "
                         f"(recovery of the loss gap {_fmt(sc['recovery_forget_loss'])})")
        else:
            lines.append(f"- recovery of the edited-set accuracy gap: {_fmt(sc['recovery_edited_acc'])}, "
                         f"of the edited-set loss gap: {_fmt(sc['recovery_edited_loss'])}")
        lines += [f"- damping λ = {sc['damping']:.3g}" + (f" ({sc['damping_estimate']['rule']}, top eigenvalue "
                                                         f"{sc['damping_estimate']['top_eigenvalue']:.3g})"
                                                         if sc.get("damping_estimate") else ""),
                  f"- time: retrain {sc['retrain_seconds']:.1f} s, unlearn {sc['unlearn_seconds']:.1f} s; final "
                  f"residual {sc['residual']:.1e} after {sc['solver_steps']} steps, stationarity gap "
                  f"{_fmt(sc['stationarity_gap'])}", ""]
    m = report["machine"]
    lines += [f"Machine: {m['cpu']} ({m['cores']} cores); torch {report['versions']['torch']}, transformers "
              f"{report['versions']['transformers']}, peft {report['versions']['peft']}; seed "
              f"{report['config']['seed']}; total {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["scenarios"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for t in tasks:
        hist = report["scenarios"][t]["residual_history"]
        ax1.semilogy([h[0] for h in hist], [max(h[1], 1e-16) for h in hist], marker="o", ms=3, label=t.upper())
    ax1.set_xlabel("solver step")
    ax1.set_ylabel("relative residual ‖(H+λI)δ − b‖/‖b‖")
    ax1.set_title("solver convergence")
    ax1.legend()
    width = 0.25
    for j, role in enumerate(("retrained", "corrupted", "mmerase")):
        vals = [100 * report["scenarios"][t]["rows"][role]["test_acc"] for t in tasks]
        ax2.bar([i + (j - 1) * width for i in range(len(tasks))], vals, width, label=role)
    ax2.set_xticks(range(len(tasks)), [t.upper() for t in tasks])
    ax2.set_ylabel("held-out accuracy (%)")
    ax2.set_title("test accuracy")
    ax2.legend()
    lo = min(100 * report["scenarios"][t]["rows"][r]["test_acc"] for t in tasks
             for r in ("retrained", "corrupted", "mmerase"))
    ax2.set_ylim(max(0, lo - 10), 100)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
