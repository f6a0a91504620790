"""Recovery against compute: every unlearning method at budgets of one retraining's compute, tuned on validation.

    python benchmarks/frontier.py [--smoke] [--out DIR] [--work DIR] [--resume] [--report-only FILE]
                                  [--seed N] [--methods a,b] [--scenarios digits-rc,...]
    python benchmarks/frontier.py --spread RUN.json ... --out DIR     # spread over runs of several seeds

Scenarios: the demo's three digits scenarios (RC, QM, IR on the tiny LLaVA, :mod:`mmerase.scenarios`) and one
text-only scenario (a tiny Llama that spells numbers, RC). Methods: influence and every baseline of
:mod:`mmerase.methods`. Budgets: 3%, 10%, 30% and 100% of one retraining's sample passes (one retraining = epochs ×
the edited training set; the accounting's unit, :mod:`mmerase.methods.accounting`).

Fair by construction: every method gets the same number of hyper-parameter trials (:data:`TRIALS`), each trial is one
run whose checkpoints score every budget (a gradient method's at the last step within each budget, with a constant
learning rate, so a checkpoint equals a run with that budget; influence's after every Newton step, with the passes
counted so far; a method whose cheapest answer costs more than a budget has no point there), and at each budget the
trial with the best validation score is reported on test. The score: the recovery of the held-out accuracy gap for
RC and QM; for IR (whose forget set has no validation copy) the KL divergence from the retrained adapter's
next-token distributions on validation digits, smaller is better. Compute is counted the same way for every method
in one run: sample passes by hooks, CPU time of the process, both as fractions of one retraining measured here.
Checkpoints are scored after the run (their adapters are kept in memory), so evaluation costs nothing to a method.

Outputs ``frontier.json`` (every trial, checkpoint, choice), ``frontier.md`` (tables) and ``frontier.png`` (one panel
per scenario, recovery against compute on a log scale, retraining marked). ``--resume`` continues an interrupted run
from ``OUT/frontier.partial.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmerase.data import load_dataset  # noqa: E402
from mmerase.editfile import parse_edits  # noqa: E402
from mmerase.demo import preparation_settings  # noqa: E402
from mmerase.influence import InfluenceEngine, SolverConfig  # noqa: E402
from mmerase.methods import CONFIGS, Checkpoints, PassCounter, unlearn  # noqa: E402
from mmerase.metrics import recovery_ratio  # noqa: E402
from mmerase.models import LoadOptions, load_model  # noqa: E402
from mmerase.prepare import prepare  # noqa: E402
from mmerase.record import machine, versions, write_json  # noqa: E402
from mmerase.scenarios import (ScenarioConfig, SpellConfig, build_scenarios, build_spell_scenarios,  # noqa: E402
                               evaluate_bundle, stage)

BUDGETS = (0.03, 0.1, 0.3, 1.0)
#: influence is also scored at these budgets (its refinement reaches retraining's quality only beyond one retraining
#: at this size; the demo's five minutes allow several), and its trials stop once they cost the largest
INFLUENCE_EXTRA = (3.0, 10.0, 100.0)
INFLUENCE_CAP = max(INFLUENCE_EXTRA)
METHODS = ("influence", "finetune", "ga", "graddiff", "npo", "kl")
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
#: the hyper-parameter trials, the same number per method
TRIALS: dict[str, list[dict[str, Any]]] = {
    "influence": [
        # first order, the whole training set as curvature set
        {"curvature": "ggn", "damping": "auto", "tol": 1e-2, "max_steps": 100, "refine_steps": 0},
        # an EK-FAC preparation (built in the request, counted) reused by 20 one-step refinement steps; λ from
        # 5 Lanczos products over 64 sampled pairs, at two scales
        {"prepare": {"kind": "ekfac", "damping_scale": 3e-3}, "method": "prepared", "curvature": "ggn",
         "residual_samples": 64, "refine_steps": 20, "refine_damping": "step", "refine_edit_samples": 0},
        {"prepare": {"kind": "ekfac", "damping_scale": 1e-2}, "method": "prepared", "curvature": "ggn",
         "residual_samples": 64, "refine_steps": 20, "refine_damping": "step", "refine_edit_samples": 0},
        # inexact Gauss-Newton refinement (5 CG steps each) on the whole training set
        {"curvature": "ggn", "damping": "auto", "tol": 1e-2, "max_steps": 5, "refine_steps": 10,
         "refine_damping": "step", "refine_edit_samples": 0},
    ],
    **{m: [{"lr": lr} for lr in LRS] for m in METHODS[1:]},
}


def trials_for(smoke: bool) -> dict[str, list[dict[str, Any]]]:
    """The trials a run makes: all of :data:`TRIALS`, or in a smoke run one per method (influence's prepared
    refinement, three steps)."""
    if not smoke:
        return TRIALS
    return {m: [{**TRIALS[m][1], "refine_steps": 3}] if m == "influence" else TRIALS[m][:1] for m in METHODS}


def log(*args: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


class StopRun(Exception):
    """Raised from a checkpoint to end a run that has spent more than it may show."""


class Scenario:
    """One scenario's files, its evaluation sets, the retrained adapter's reference distributions and one
    retraining's cost measured in this run."""

    def __init__(self, name: str, files: Any, task: str, cfg: Any) -> None:
        self.name, self.files, self.task, self.cfg = name, files, task, cfg
        self.train = load_dataset(files.train_file(task))
        self.requests = parse_edits(files.edits_file(task), self.train)
        self.sets = {**files.eval_sets(task, "validation"), **files.eval_sets(task, "test")}
        self.retrain_passes = files.retrain_passes(task, cfg.epochs)
        self.options = LoadOptions(device="cpu")
        self.rows = {role: self.evaluate(self.bundle(path)) for role, path in
                     (("corrupted", files.corrupted(task)), ("retrained", files.retrained(task)))}
        self.reference = self.distributions(self.bundle(files.retrained(task)))
        self.rows["retrained"].update(kl_validation=0.0, kl_test=0.0)
        self.rows["corrupted"].update(self.kl(self.bundle(files.corrupted(task))))

    def bundle(self, adapter: Path) -> Any:
        return load_model(self.files.base, adapter=adapter, options=self.options)

    def evaluate(self, bundle: Any) -> dict[str, Any]:
        """``evaluate_bundle``'s rows; IR's also keep each removed pair's loss (``forget_losses``, in the edits
        file's order), so that a report can choose on some of the pairs and report on the others."""
        row: dict[str, Any] = evaluate_bundle(bundle, self.sets)
        if self.task == "ir":
            row["forget_losses"] = bundle.per_sample_losses(self.sets["forget"][0], batch_size=64).tolist()
        return row

    @torch.no_grad()
    def distributions(self, bundle: Any) -> dict[str, list[torch.Tensor]]:
        """log p over the vocabulary at every answer token of each held-out sample."""
        bundle.model.eval()
        out = {}
        for split in ("validation", "test"):
            rows = []
            for sample in self.sets[split][0]:
                batch = bundle.collate([sample])
                logits = bundle.loss_fn.outputs(bundle.model, batch)[0, :-1].double()
                mask = batch["labels"][0, 1:] != -100
                rows.append(torch.log_softmax(logits[mask], dim=-1))
            out[split] = rows
        return out

    def kl(self, bundle: Any) -> dict[str, float]:
        """KL(retrained ‖ this) per answer token, averaged over tokens then samples, on each held-out split."""
        mine = self.distributions(bundle)
        out = {}
        for split, ref in self.reference.items():
            per = [float((r.exp() * (r - m)).sum(-1).mean()) for r, m in zip(ref, mine[split])]
            out[f"kl_{split}"] = sum(per) / len(per)
        return out

    def score(self, bundle: Any) -> dict[str, Any]:
        row = {**self.evaluate(bundle), **self.kl(bundle)}
        c, r = self.rows["corrupted"], self.rows["retrained"]
        edited = "forget" if self.task == "ir" else "edited"
        rec = {f"recovery_{s}_acc": recovery_ratio(row[f"{s}_acc"], c[f"{s}_acc"], r[f"{s}_acc"])
               for s in ("validation", "test")}
        rec[f"recovery_{edited}_loss"] = recovery_ratio(row[f"{edited}_loss"], c[f"{edited}_loss"],
                                                        r[f"{edited}_loss"])
        if self.task == "ir":
            rec["forget_loss_rel_diff"] = abs(row["forget_loss"] - r["forget_loss"]) / abs(r["forget_loss"])
        return {"row": row, **rec}

    def selection_score(self, scored: dict[str, Any]) -> float:
        """Higher is better, on validation only."""
        if self.task == "ir":
            return -scored["row"]["kl_validation"]
        value = scored["recovery_validation_acc"]
        return -math.inf if value is None else value


def measure_retraining(sc: Scenario, work: Path) -> dict[str, float]:
    """One retraining of this scenario, timed in this process (CPU seconds, as the methods are)."""
    from mmerase.scenarios import train_scenario_adapter

    data = load_dataset(sc.files.data_dir / ("train_removed.json" if sc.task == "ir" else "train_clean.json"))
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    train_scenario_adapter(sc.files.base, data, work / f"retrain-{sc.name}", sc.cfg)
    return {"cpu_s": time.process_time() - t_cpu, "wall_s": time.perf_counter() - t_wall,
            "sample_passes": sc.retrain_passes}


def engine_for(sc: Scenario, method: str) -> tuple[Any, InfluenceEngine]:
    """The corrupted adapter as the method runs it: influence with the frozen image features cached (as
    `mmerase unlearn` does), the gradient methods as the fine-tune runs the model."""
    bundle = sc.bundle(sc.files.corrupted(sc.task))
    cache = bundle.feature_cache() if method == "influence" else None
    loss, collate = (cache.loss_fn, cache.collate) if cache is not None else (bundle.loss_fn, bundle.collate)
    return bundle, InfluenceEngine(bundle.model, loss, sc.train, collate_fn=collate)


def build_preparation(engine: InfluenceEngine, spec: dict[str, Any], seed: int) -> tuple[Any, float]:
    """A preparation built inside the request (its passes counted: returned), exactly as `mmerase demo` builds one
    (:func:`mmerase.demo.preparation_settings`)."""
    solver, config = preparation_settings(spec["kind"], spec["damping_scale"], "ggn", seed, False)
    with PassCounter(engine.model) as counted:
        prep = prepare(engine, solver, config)
    return prep.preconditioner, (counted.forward + 2 * counted.backward) / 3


def run_trial(sc: Scenario, method: str, params: dict[str, Any], seed: int,
              budgets: tuple[float, ...] = BUDGETS) -> dict[str, Any]:
    """One run; a snapshot of the adapter at every checkpoint (a baseline's: at each of ``budgets`` × one
    retraining), scored afterwards."""
    bundle, engine = engine_for(sc, method)
    snapshots: list[tuple[dict[str, Any], list[torch.Tensor]]] = []
    t_cpu = time.process_time()

    def keep(info: Any) -> None:
        cost = {"step": info.step, "sample_passes": offset + info.sample_passes, "cpu_s": time.process_time() - t_cpu}
        snapshots.append((cost, [p.detach().clone() for p in engine.params]))
        if method == "influence" and cost["sample_passes"] > INFLUENCE_CAP * sc.retrain_passes:
            raise StopRun

    edits = [r.edit for r in sc.requests]
    preconditioner, offset = None, 0.0
    if method == "influence":
        solver = {k: v for k, v in params.items() if k != "prepare"}
        config = SolverConfig(**{**solver, "seed": seed, "batch_size": 128, "progress": False})
        if "prepare" in params:
            preconditioner, offset = build_preparation(engine, params["prepare"], seed)
        checkpoints, budget = Checkpoints(keep), None
    else:
        config = CONFIGS[method](**{**params, "seed": seed, "batch_size": 16, "progress": False})
        checkpoints = Checkpoints(keep, at=tuple(b * sc.retrain_passes for b in budgets))
        budget = max(budgets) * sc.retrain_passes
    theta_hat = [p.detach().clone() for p in engine.params]
    error = None
    try:
        unlearn(engine, None, edits, method, config, budget, retrain_passes=sc.retrain_passes,
                checkpoints=checkpoints, preconditioner=preconditioner, apply=False)
    except StopRun:
        pass
    except Exception as e:  # a diverged or refused run is reported, its checkpoints so far kept
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    points = []
    for cost, theta in snapshots:
        engine.set_parameters(theta)
        points.append({**cost, "fraction": cost["sample_passes"] / sc.retrain_passes, **sc.score(bundle)})
    engine.set_parameters(theta_hat)
    return {"method": method, "params": params, "seed": seed, "points": points, "error": error,
            "preparation_damping": None if preconditioner is None else preconditioner.damping}


def choose(sc: Scenario, trials: list[dict[str, Any]], retrain: dict[str, float]) -> dict[str, Any]:
    """Per method and budget: the trial whose last checkpoint within the budget scores best on validation."""
    out: dict[str, Any] = {}
    for method in (m for m in METHODS if any(t["method"] == m for t in trials)):
        per_budget = {}
        for budget in BUDGETS + (INFLUENCE_EXTRA if method == "influence" else ()):
            best = None
            for t, trial in enumerate(trials):
                if trial["method"] != method:
                    continue
                within = [p for p in trial["points"] if p["fraction"] <= budget * (1 + 1e-9)]
                if not within:
                    continue
                point = within[-1]
                key = sc.selection_score(point)
                if best is None or key > best[0]:
                    best = (key, t, point)
            if best is not None:
                point = best[2]
                per_budget[str(budget)] = {"trial": best[1], "params": trials[best[1]]["params"],
                                           "cpu_fraction": point["cpu_s"] / retrain["cpu_s"], **point}
        out[method] = per_budget
    return out


#: what the demo's five minutes allow per scenario, in retrainings of compute (measured: benchmarks/demo_report.md)
DEMO_BUDGET = 10.0


def choose_demo(report: dict[str, Any]) -> dict[str, Any] | None:
    """The demo's default, chosen on validation: the influence trial (and number of Newton steps) whose validation
    accuracy recovery, averaged over the digits RC and QM scenarios, is highest at the last checkpoint within
    :data:`DEMO_BUDGET` retrainings; the step count is the smaller of the two scenarios' (both stay within)."""
    names = [n for n in ("digits-rc", "digits-qm") if n in report["scenarios"]]
    best = None
    for params in report["config"]["trials"]["influence"]:
        lasts = []
        for name in names:
            trial = next((t for t in report["scenarios"][name]["trials"]
                          if t["method"] == "influence" and t["params"] == params), None)
            within = [p for p in (trial or {}).get("points", []) if p["fraction"] <= DEMO_BUDGET]
            if within:
                lasts.append(within[-1])
        if len(lasts) < len(names) or not names:
            continue
        score = sum(p["recovery_validation_acc"] for p in lasts) / len(lasts)
        if best is None or score > best["validation_score"]:
            best = {"params": params, "newton_steps": min(p["step"] for p in lasts), "validation_score": score,
                    "fractions": [p["fraction"] for p in lasts]}
    return best


def build(work: Path, smoke: bool, seed: int, names: set[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """The scenarios' files (built once into ``work``, reused by --resume); ``names``: only these scenarios."""
    import pickle

    out = {}
    digit_tasks = tuple(t for t in (("rc",) if smoke else ("rc", "qm", "ir"))
                        if names is None or f"digits-{t}" in names)
    for kind, cfg, builder in (("digits", ScenarioConfig(seed=seed, quick=smoke, device="cpu", progress=False,
                                                     tasks=digit_tasks or ("rc",)), build_scenarios),
                               ("spell", SpellConfig(seed=seed, quick=smoke, device="cpu", progress=False,
                                                     tasks=("rc",)), build_spell_scenarios)):
        if names is not None and not any(f"{kind}-{t}" in names for t in cfg.tasks):
            continue
        root, pick = work / f"{kind}-seed{seed}", work / f"{kind}-seed{seed}.pkl"
        if pick.is_file():
            files = pickle.loads(pick.read_bytes())
        else:
            files = builder(root, cfg)
            pick.write_bytes(pickle.dumps(files))
        for task in cfg.tasks:
            out[f"{kind}-{task}"] = (files, task, cfg)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    partial = args.out / "frontier.partial.json"
    report = json.loads(partial.read_text()) if args.resume and partial.is_file() else {
        "config": {"budgets": BUDGETS, "influence_extra": INFLUENCE_EXTRA,
                   "trials": {m: t for m, t in trials_for(args.smoke).items() if m in args.methods},
                   "smoke": args.smoke,
                   "seed": args.seed, "threads": torch.get_num_threads()}, "scenarios": {}}
    for name, (files, task, cfg) in build(args.work, args.smoke, args.seed, args.scenarios).items():
        with stage(f"scenario {name}: references"):
            sc = Scenario(name, files, task, cfg)
        rep = report["scenarios"].setdefault(name, {"trials": []})
        rep.update(rows=sc.rows, retrain_passes=sc.retrain_passes, n_edits=len(sc.requests))
        if "retraining" not in rep:
            rep["retraining"] = measure_retraining(sc, args.work)
        done = {(t["method"], json.dumps(t["params"], sort_keys=True)) for t in rep["trials"]}
        for method in report["config"]["trials"]:
            for params in report["config"]["trials"][method]:
                if (method, json.dumps(params, sort_keys=True)) in done:
                    continue
                with stage(f"{name}: {method} {params}"):
                    rep["trials"].append(run_trial(sc, method, params, args.seed))
                write_json(partial, report)
        rep["chosen"] = choose(sc, rep["trials"], rep["retraining"])
    report.update(machine=machine(), versions=versions(), date=time.strftime("%Y-%m-%d %H:%M %Z"))
    report["demo_choice"] = choose_demo(report)
    return report


def _f(x: Any, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    m, v = report["machine"], report["versions"]
    lines = ["# Recovery against compute: every method at budgets of one retraining", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), torch {v['torch']}, transformers {v['transformers']}, peft "
             f"{v['peft']}; seed {report['config']['seed']}; {report['date']}. Budgets are fractions of one "
             "retraining's sample passes; each cell is the trial chosen on validation at that budget, reported on "
             f"test. Trials per method: {len(TRIALS['influence'])} (`TRIALS` in benchmarks/frontier.py).", ""]
    columns = tuple(report["config"]["budgets"]) + tuple(report["config"].get("influence_extra", ()))
    d = report.get("demo_choice")
    if d:
        lines += [f"**The demo's default**, chosen on validation among what fits its minutes (≤ {DEMO_BUDGET:g} "
                  f"retrainings per scenario): influence {json.dumps(d['params'])}, {d['newton_steps']} Newton steps "
                  f"(mean validation recovery over digits RC and QM {d['validation_score']:.2f}).", ""]
    for name, rep in report["scenarios"].items():
        key = "forget_loss_rel_diff" if name.endswith("-ir") else "recovery_test_acc"
        what = "forget loss, relative distance to retrained's (smaller is better)" if name.endswith("-ir") else \
            "recovery of the test-accuracy gap (1 = retrained)"
        lines += [f"## {name} ({rep['n_edits']} edits; one retraining = {rep['retrain_passes']} sample passes, "
                  f"{rep['retraining']['cpu_s']:.1f} s CPU)", "", f"Cell: {what} · KL to retrained on test · "
                  "cost as passes / CPU fraction of a retraining.", "",
                  "| method | " + " | ".join(f"≤ {100 * b:g}%" for b in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for method, per in rep["chosen"].items():
            cells = []
            for b in columns:
                p = per.get(str(b))
                none = "no point" if b in BUDGETS or method == "influence" else ""
                cells.append(none if p is None else f"{_f(p[key])} · {_f(p['row']['kl_test'], 3)} · "
                             f"{_f(p['fraction'])}/{_f(p['cpu_fraction'])}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def cell_values(reports: list[dict[str, Any]], name: str, method: str, budget: str) -> list[float] | None:
    """The chosen cell's metric (test recovery; IR: forget-loss distance) in each run, or None if a run lacks it."""
    key = "forget_loss_rel_diff" if name.endswith("-ir") else "recovery_test_acc"
    values = []
    for rep in reports:
        p = rep["scenarios"].get(name, {}).get("chosen", {}).get(method, {}).get(budget)
        if p is None or p.get(key) is None:
            return None
        values.append(p[key])
    return values


def spread_markdown(reports: list[dict[str, Any]]) -> str:
    """Per scenario, method and budget: mean (min–max) of the chosen cell over the runs (one per seed)."""
    seeds = [r["config"]["seed"] for r in reports]
    names = [n for n in reports[0]["scenarios"] if all(n in r["scenarios"] for r in reports)]
    lines = ["# Recovery against compute over seeds", "", f"Runs of `frontier.py` with seeds {seeds}; each cell: "
             "mean (min – max) over the seeds of the trial chosen on validation at that budget, read on test.", ""]
    for name in names:
        columns = [str(b) for b in reports[0]["config"]["budgets"]] + \
            [str(b) for b in reports[0]["config"].get("influence_extra", ())]
        what = "forget loss, relative distance to retrained's" if name.endswith("-ir") else "test-accuracy recovery"
        lines += [f"## {name} ({what})", "", "| method | " + " | ".join(f"≤ {100 * float(b):g}%" for b in columns)
                  + " |", "|---|" + "---|" * len(columns)]
        for method in [m for m in reports[0]["scenarios"][name]["chosen"]
                       if all(m in r["scenarios"][name]["chosen"] for r in reports)]:  # methods every run has
            cells = []
            for b in columns:
                v = cell_values(reports, name, method, b)
                cells.append("" if v is None else f"{sum(v) / len(v):.2f} ({min(v):.2f} – {max(v):.2f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scenarios"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        rep = report["scenarios"][name]
        ir = name.endswith("-ir")
        for method, per in rep["chosen"].items():
            pts = sorted((p["fraction"], p["recovery_forget_loss"] if ir else p["recovery_test_acc"])
                         for p in per.values() if p.get("recovery_test_acc") is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.plot([1.0], [1.0], marker="*", ms=12, color="black", label="retraining")
        ax.set_xscale("log")
        ax.set_xlabel("compute (fraction of one retraining)")
        ax.set_ylabel("forget-loss recovery" if ir else "test-accuracy recovery")
        ax.set_title(name)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="reduced sizes, one trial per method (CI)")
    p.add_argument("--out", type=Path, default=Path("benchmarks"), help="where frontier.{json,md,png} go")
    p.add_argument("--work", type=Path, default=None, help="scenario files (default: OUT/frontier-work)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenarios and the methods")
    p.add_argument("--resume", action="store_true", help="continue from OUT/frontier.partial.json")
    p.add_argument("--report-only", type=Path, default=None, help="re-render the tables and plot from a JSON")
    p.add_argument("--methods", default=",".join(METHODS), help="only these methods (comma-separated)")
    p.add_argument("--scenarios", default=None, help="only these scenarios, e.g. digits-rc,digits-qm (default: all)")
    p.add_argument("--spread", type=Path, nargs="+", default=None, metavar="JSON",
                   help="write OUT/frontier_seeds.md: each cell's spread over these runs (one per seed)")
    args = p.parse_args(argv)
    args.methods = [m for m in METHODS if m in args.methods.split(",")]
    args.scenarios = set(args.scenarios.split(",")) if args.scenarios else None
    args.out.mkdir(parents=True, exist_ok=True)
    if args.spread:
        reports = [json.loads(path.read_text()) for path in args.spread]
        (args.out / "frontier_seeds.md").write_text(spread_markdown(reports), encoding="utf-8")
        return 0
    if args.report_only:
        report = json.loads(args.report_only.read_text())
        report["demo_choice"] = choose_demo(report)
    else:
        args.work = args.work or args.out / "frontier-work"
        args.work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)
        report = run(args)
        write_json(args.out / "frontier.json", report)
        (args.out / "frontier.partial.json").unlink(missing_ok=True)
    (args.out / "frontier.md").write_text(markdown(report), encoding="utf-8")
    plot(report, args.out / "frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
