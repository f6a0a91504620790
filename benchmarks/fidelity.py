"""Fidelity against retraining on the demo's scenarios (issue 6): curvature × damping rule × Newton refinement.

    python benchmarks/fidelity.py                 # full: the demo's default sizes (~1 h on one core)
    python benchmarks/fidelity.py --smoke --out /tmp/fid   # tiny sizes (CI)

For each scenario (RC, QM, IR) the demo's corrupted adapter is unlearned with every curvature and every damping rule
λ = s × (top eigenvalue) (raised for negative curvature; ``mmerase.influence.damping``), s on a grid. One Lanczos
run started at b gives k-step CG's answer for every λ at once (``shifted_solutions``), so the damping sweep costs one
solve per curvature. Every candidate is scored on the **validation split** (digits neither trained on nor tested);
the default (curvature, s) is the one with the best mean validation-accuracy recovery over RC and QM. For each
curvature at its best s, a solve with 2 Newton refinement steps reports steps 0, 1, 2 (``solve(callback=)``);
``--refine-runs CURVATURE:MODE ...`` picks which (curvature, refine_damping) pairs to refine instead, e.g.
``hessian:step`` (Levenberg–Marquardt steps). The curvature, refinement mode and number of steps are chosen on
validation among every refined run (the best mean recovery over RC and QM). The test split is used only for the
final table.

Recovery ratio = (unlearned − corrupted) / (retrained − corrupted), the retrained adapter trained from scratch on the
edited data with the same recipe. Writes fidelity.json, fidelity.md and fidelity.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmerase import InfluenceEngine, SolverConfig
from mmerase.demo import DemoConfig
from mmerase.scenarios import build_scenarios, evaluate_bundle, recoveries
from mmerase.editfile import parse_edits
from mmerase.data import load_dataset
from mmerase.influence import vectors as V
from mmerase.influence.damping import damping_rule
from mmerase.influence.lanczos import lanczos, shifted_solutions
from mmerase.models import LoadOptions, load_model
from mmerase.record import machine, versions

SCALES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
CURVATURES = ("ggn", "hessian", "fisher")
BAR_TASKS = ("rc", "qm")


def _log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


class Scenario:
    """One task's engine at the corrupted adapter (frozen image features cached) and its evaluation sets."""

    def __init__(self, files: Any, task: str) -> None:
        self.task = task
        self.bundle = load_model(files.base, adapter=files.corrupted(task), options=LoadOptions(device="cpu"))
        cache = self.bundle.feature_cache()
        train = load_dataset(files.train_file(task))
        self.edits = [r.edit for r in parse_edits(files.edits_file(task), train)]
        self.engine = InfluenceEngine(self.bundle.model, cache.loss_fn, train, collate_fn=cache.collate)
        self.theta = [p.detach().clone() for p in self.engine.params]
        self.sets = {**files.eval_sets(task, "validation"), **files.eval_sets(task, "test")}
        self.rows = {"corrupted": evaluate_bundle(self.bundle, self.sets),
                     "retrained": evaluate_bundle(load_model(files.base, adapter=files.retrained(task),
                                                             options=LoadOptions(device="cpu")), self.sets)}

    def score(self, flat_delta: torch.Tensor | None = None) -> dict[str, Any]:
        """Evaluate θ̂ + δ (δ flattened; None: the model as it is) and the recovery ratios."""
        if flat_delta is not None:
            self.place(flat_delta)
        try:
            row = evaluate_bundle(self.bundle, self.sets)
        finally:
            self.place(None)
        rows = {**self.rows, "mmerase": row}
        return {"row": row, **recoveries(self.task, rows, "validation"), **recoveries(self.task, rows, "test")}

    def place(self, flat_delta: torch.Tensor | None) -> None:
        """θ ← θ̂ + δ (None: θ̂)."""
        self.engine.set_parameters(self.theta, None if flat_delta is None else V.unflatten(flat_delta, self.theta))


def sweep_damping(sc: Scenario, curvature: str, scales: tuple[float, ...], krylov: int) -> dict[str, Any]:
    """Every damping rule for one curvature from one Lanczos run started at b."""
    eng = sc.engine
    t0 = time.perf_counter()
    b = eng.edit_gradient(sc.edits, 128)
    with eng.inference_mode():  # products as a solve runs them
        values, ritz, _, lz = lanczos(lambda v: eng.product(v, curvature, None, 128), eng.params, krylov, start=b)
    # the extreme Ritz values of this run stand in for the library's estimate (20 steps from a random start):
    # extreme eigenvalues converge first from any start, and this saves 20 products per curvature and scenario
    top, bottom = float(values[0]), float(values[-1])
    lams = [damping_rule(s, top, bottom) for s in scales]
    sols = shifted_solutions(ritz, lz["tridiagonal"], V.norm(b), [lam for lam, _ in lams])
    seconds = time.perf_counter() - t0
    rows = []
    for s, (lam, rule), (x, resid) in zip(scales, lams, sols):
        r = {"scale": s, "damping": lam, "rule": rule, "residual": resid, "delta_norm": float(x.norm()),
             **sc.score(x)}
        _log(f"  {sc.task} {curvature} s={s:g} λ={lam:.3g} resid={resid:.1e} val={r['recovery_validation_acc']} "
             f"test={r['recovery_test_acc']}")
        rows.append(r)
    return {"top_eigenvalue": top, "bottom_ritz_value": bottom, "krylov_steps": lz["lanczos_steps"],
            "seconds": seconds, "rules": rows}


def refine(sc: Scenario, curvature: str, damping: float, steps: int, tol: float, seed: int,
           mode: str = "proximal") -> list[dict[str, Any]]:
    """A CG solve with ``steps`` Newton refinement steps; every step's update scored (0 = the plain update)."""
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def seen(k: int, delta: dict[str, torch.Tensor], rec: dict[str, Any]) -> None:
        flat = V.flatten([delta[n] for n in sc.engine.names])
        out.append({"refine_steps": k - 1, "stationarity_gap": rec["stationarity_gap"],
                    "seconds_so_far": time.perf_counter() - t0, **sc.score(flat)})
        sc.place(flat)  # score() restored θ̂; the solve continues from θ̂ + δ_k

    res = sc.engine.solve(sc.edits, SolverConfig(method="cg", curvature=curvature, damping=damping, tol=tol,
                                                 max_steps=100, batch_size=128, seed=seed, refine_steps=steps,
                                                 refine_damping=mode, progress=False), callback=seen)
    for r, step in zip(out, res.info["refinement"]):
        r.update(step_size=step.get("step_size"), residual=step.get("residual"))
    rejected = [step for step in res.info["refinement"] if step.get("rejected")]
    if rejected and out:
        out[-1]["next_step_rejected_gap"] = rejected[0]["stationarity_gap"]
    for r in out:
        _log(f"  {sc.task} {curvature} {mode} λ={damping:.3g} K={r['refine_steps']} gap={r['stationarity_gap']:.2f} "
             f"val={r['recovery_validation_acc']} test={r['recovery_test_acc']}")
    return out


def _label(curvature: str, mode: str) -> str:
    return curvature if mode == "proximal" else f"{curvature}, {mode}-damped"


def _mean(xs: list[float | None]) -> float:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else float("-inf")


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg = DemoConfig(quick=args.smoke, seed=args.seed, progress=False)
    work = Path(args.work)
    t0 = time.perf_counter()
    files = build_scenarios(work / "scenarios", cfg)
    build_s = time.perf_counter() - t0
    scenarios = {t: Scenario(files, t) for t in cfg.tasks}
    report: dict[str, Any] = {"config": {"demo": {k: v for k, v in vars(cfg).items()}, "scales": list(args.scales),
                                         "curvatures": list(args.curvatures), "krylov": args.krylov,
                                         "refine_tol": args.tol, "seed": args.seed},
                              "sizes": files.sizes, "build_seconds": build_s,
                              "retrain_seconds": {t: files.retrain_seconds(t) for t in cfg.tasks},
                              "baseline": {t: sc.rows for t, sc in scenarios.items()}, "damping": {}, "refinement": {}}
    if args.reuse:  # the damping sweep of an earlier run with the same settings (it does not involve refinement)
        earlier = json.loads(Path(args.reuse).read_text(encoding="utf-8"))
        for key in ("scales", "curvatures", "krylov", "seed"):
            if earlier["config"][key] != report["config"][key]:
                raise SystemExit(f"--reuse {args.reuse}: its {key} {earlier['config'][key]} differs from this run's")
        if earlier["baseline"] != report["baseline"]:
            raise SystemExit(f"--reuse {args.reuse}: its corrupted/retrained adapters score differently")
        report["damping"], report["damping_reused_from"] = earlier["damping"], str(args.reuse)
    for curv in args.curvatures if not args.reuse else ():
        for t, sc in scenarios.items():
            _log(f"damping sweep: {t} {curv}")
            report["damping"].setdefault(curv, {})[t] = sweep_damping(sc, curv, tuple(args.scales), args.krylov)
    # choose on validation: per curvature the best scale (mean over RC and QM), then the best curvature
    best: dict[str, dict[str, Any]] = {}
    for curv in args.curvatures:
        per = report["damping"][curv]
        scores = [(_mean([per[t]["rules"][i]["recovery_validation_acc"] for t in BAR_TASKS if t in per]), i)
                  for i in range(len(args.scales))]
        score, i = max(scores)
        best[curv] = {"scale": args.scales[i], "validation_score": score}
    chosen_curv = max(best, key=lambda c: best[c]["validation_score"])
    pairs = [tuple(r.split(":")) for r in args.refine_runs] if args.refine_runs else \
        [(c, "proximal") for c in args.curvatures if c in (args.refine_curvatures or [chosen_curv])]
    runs = {_label(curv, mode): (curv, mode) for curv, mode in pairs}
    for label, (curv, mode) in runs.items():
        for t, sc in scenarios.items():
            lam = report["damping"][curv][t]["rules"][args.scales.index(best[curv]["scale"])]["damping"]
            _log(f"refinement: {t} {label} λ={lam:.3g}")
            report["refinement"].setdefault(label, {})[t] = refine(sc, curv, lam, args.refine, args.tol, args.seed,
                                                                   mode)
    # choose (run, steps) on validation; a run whose refinement stopped early keeps its last step for larger k
    k_scores = {label: {k: _mean([per[t][min(k, len(per[t]) - 1)]["recovery_validation_acc"]
                                  for t in BAR_TASKS if t in per]) for k in range(args.refine + 1)}
                for label, per in report["refinement"].items()}
    chosen_label, chosen_k = max(((lb, k) for lb in k_scores for k in k_scores[lb]),
                                 key=lambda lk: (k_scores[lk[0]][lk[1]], -lk[1]))
    chosen_curv, chosen_mode = runs[chosen_label]
    per = report["refinement"][chosen_label]
    final = {t: per[t][min(chosen_k, len(per[t]) - 1)] for t in scenarios}
    report["chosen"] = {"curvature": chosen_curv, "scale": best[chosen_curv]["scale"], "refine_steps": chosen_k,
                        "refine_damping": chosen_mode, "per_curvature": best,
                        "refine_validation_scores": k_scores}
    report["final"] = final
    report["bars"] = {
        **{f"{t}_test_recovery_ge_0.8": (final[t]["recovery_test_acc"] or float("-inf")) >= 0.8
           for t in BAR_TASKS if t in final},
        **({"ir_forget_loss_within_10pct": final["ir"]["forget_loss_rel_diff"] <= 0.1} if "ir" in final else {}),
    }
    report["seconds"] = time.perf_counter() - t0
    report["machine"], report["versions"] = machine(), versions()
    return report


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown(rep: dict[str, Any]) -> str:
    c, s = rep["chosen"], rep["sizes"]
    m = rep["machine"]
    lines = [
        "# Fidelity against retraining: curvature × damping rule × Newton refinement", "",
        f"Demo scenarios: {s['train']} training pairs, {s['edits']} corrupted; validation {s['validation']} digits "
        f"(choose), test {s['test']} digits (report only). Seed {rep['config']['seed']}. Machine: {m['cpu']} "
        f"({m['cores']} cores), torch {rep['versions']['torch']}, transformers {rep['versions']['transformers']}, "
        f"peft {rep['versions']['peft']}. Total {rep['seconds'] / 60:.0f} min"
        + (f" (the damping sweep reused from an earlier run with the same settings and adapters, "
           f"`{Path(rep['damping_reused_from']).name}`)" if rep.get("damping_reused_from") else "") + ".", "",
        "## Baselines (held-out accuracy; edited-set loss)", "",
        "| scenario | corrupted val / test | retrained val / test | retrain s |", "|---|---|---|---|",
    ]
    for t, rows in rep["baseline"].items():
        cr, rr = rows["corrupted"], rows["retrained"]
        lines.append(f"| {t.upper()} | {100 * cr['validation_acc']:.1f}% / {100 * cr['test_acc']:.1f}% | "
                     f"{100 * rr['validation_acc']:.1f}% / {100 * rr['test_acc']:.1f}% | "
                     f"{rep['retrain_seconds'][t]:.1f} |")
    lines += ["", "## Damping rules, no refinement (k-step CG answers from one Lanczos run per curvature)", "",
              "Recovery of the validation / test accuracy gap, and of the edited-set loss gap (IR: forget-set loss).",
              "", "| curvature | s (λ = s·top eigenvalue) | " + " | ".join(t.upper() for t in rep["baseline"])
              + " |", "|---|---|" + "---|" * len(rep["baseline"])]
    for curv, per in rep["damping"].items():
        for i, scale in enumerate(rep["config"]["scales"]):
            cells = []
            for t in rep["baseline"]:
                r = per[t]["rules"][i]
                loss_key = "recovery_forget_loss" if t == "ir" else "recovery_edited_loss"
                cells.append(f"λ={r['damping']:.3g}: {_f(r['recovery_validation_acc'])} / "
                             f"{_f(r['recovery_test_acc'])}; loss {_f(r[loss_key])}")
            lines.append(f"| {curv} | {scale:g} | " + " | ".join(cells) + " |")
    lines += ["", "Residuals are the Lanczos relation's β_k|e_kᵀz| (exact arithmetic; below ~1e-6 float32 rounding "
              "dominates). Where the curvature is indefinite (the exact Hessian) λ is at least 2 × its most negative "
              "Ritz value, which sets λ for every small s.", "", "Top eigenvalue (Lanczos): " + ", ".join(
        f"{curv} {per[t]['top_eigenvalue']:.3g} ({t.upper()})" for curv, per in rep["damping"].items()
        for t in per), ""]
    lines += ["## Newton refinement at the validation-best s", "",
              "| curvature | scenario | steps | stationarity gap | recovery val / test | edited-loss recovery | seconds |",
              "|---|---|---|---|---|---|---|"]
    for curv, per in rep["refinement"].items():
        for t, rows in per.items():
            for r in rows:
                loss_key = "recovery_forget_loss" if t == "ir" else "recovery_edited_loss"
                stop = (f" (step {r['refine_steps'] + 1} raised the gap to {r['next_step_rejected_gap']:.2f}: "
                        "undone, stopped)") if "next_step_rejected_gap" in r else ""
                lines.append(f"| {curv} | {t.upper()} | {r['refine_steps']}{stop} | {_f(r['stationarity_gap'])} | "
                             f"{_f(r['recovery_validation_acc'])} / {_f(r['recovery_test_acc'])} | "
                             f"{_f(r[loss_key])} | {r['seconds_so_far']:.0f} |")
    lines += ["", f"## Defaults chosen on validation: curvature **{c['curvature']}**, damping **auto, s = "
              f"{c['scale']:g}**, refinement steps **{c['refine_steps']}**"
              + (f" ({c['refine_damping']}-damped)" if c.get("refine_damping", "proximal") != "proximal" else ""), "",
              "| scenario | test acc (unlearned) | recovery of test-acc gap | edited/forget | bar |", "|---|---|---|---|---|"]
    for t, r in rep["final"].items():
        if t == "ir":
            extra = f"forget loss {r['forget_loss_rel_diff'] * 100:.1f}% from retrained"
            bar = "met" if rep["bars"]["ir_forget_loss_within_10pct"] else "**missed** (≤ 10%)"
        else:
            extra = f"edited-loss recovery {_f(r['recovery_edited_loss'])}"
            bar = "met" if rep["bars"][f"{t}_test_recovery_ge_0.8"] else "**missed** (≥ 0.8)"
        lines.append(f"| {t.upper()} | {100 * r['row']['test_acc']:.1f}% | {_f(r['recovery_test_acc'])} | {extra} "
                     f"| {bar} |")
    return "\n".join(lines) + "\n"


def plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(rep["baseline"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for curv, per in rep["damping"].items():
            xs = [r["scale"] for r in per[t]["rules"]]
            ax.semilogx(xs, [r["recovery_validation_acc"] or 0 for r in per[t]["rules"]], marker="o",
                        label=f"{curv} (validation)")
            ax.semilogx(xs, [r["recovery_test_acc"] or 0 for r in per[t]["rules"]], ls=":", marker="x",
                        label=f"{curv} (test)")
        ax.axhline(0.8, color="k", lw=0.8, ls="--")
        ax.set_title(f"{t.upper()}: held-out accuracy recovery")
        ax.set_xlabel("s  (λ = s × top eigenvalue)")
        ax.set_ylim(-1.5, 1.2)
    axes[0][0].set_ylabel("(unlearned − corrupted) / (retrained − corrupted)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the demo's --quick data), for CI")
    p.add_argument("--out", default=str(Path(__file__).parent), help="where fidelity.json/.md/.png go")
    p.add_argument("--work", default=None, help="scratch folder for the scenarios (default: OUT/fidelity-work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curvatures", nargs="+", default=list(CURVATURES), choices=CURVATURES)
    p.add_argument("--scales", nargs="+", type=float, default=list(SCALES))
    p.add_argument("--krylov", type=int, default=30, help="Lanczos steps of the damping sweep")
    p.add_argument("--reuse", default=None, help="take the damping sweep from this earlier fidelity.json "
                   "(same settings; checked) and run only the refinement")
    p.add_argument("--refine-curvatures", nargs="*", default=None, choices=CURVATURES,
                   help="curvatures to refine (default: the one chosen on validation)")
    p.add_argument("--refine-runs", nargs="+", default=None, metavar="CURVATURE:MODE",
                   help="(curvature, refine_damping) pairs to refine, e.g. ggn:proximal hessian:step "
                        "(default: --refine-curvatures with proximal damping)")
    p.add_argument("--refine", type=int, default=2, help="Newton refinement steps scored")
    p.add_argument("--tol", type=float, default=1e-2, help="CG tolerance of the refinement solves")
    args = p.parse_args(argv)
    if args.smoke:
        args.curvatures = [c for c in args.curvatures if c != "fisher"][:2]
        args.scales, args.krylov, args.refine = [1e-2, 1e-1], 8, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or str(out / "fidelity-work")
    if Path(args.work).exists():
        import shutil

        shutil.rmtree(args.work)
    rep = run(args)
    (out / "fidelity.json").write_text(json.dumps(rep, indent=1, default=str), encoding="utf-8")
    md = markdown(rep)
    (out / "fidelity.md").write_text(md, encoding="utf-8")
    plot(rep, out / "fidelity.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
