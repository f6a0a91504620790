"""A refinement whose cost does not grow with the training set, measured: ``mmerase unlearn --method surrogate``.

    python benchmarks/subspace_surrogate.py [--sizes 500,4000] [--trials JSON] [--name NAME] [--out DIR] [--work DIR]

The library's refinement (``refine_steps``) passes over the whole training set at every Newton step, so its cost
grows with n (``scaling.md``: ≈ 9981 + 31·n sample passes). The ``surrogate`` method (run here through
:func:`mmerase.methods.unlearn`, as the command line runs it; its math in :class:`mmerase.influence.SubspaceSurrogate`)
replaces the training term of the edited objective by a quadratic model whose curvature comes from a fixed random
sub-sample S of the training set and keeps the edited samples exact:

    S(x) = ½ xᵀ(H_S + λI)x − g_oldᵀx + (1/n) Σ_E L(z_new; θ̂ + x)

(g_old = (1/n) Σ_E ∇L(z_old; θ̂): the old samples' loss cancels exactly between the training term and the edit
term, so only their gradient at θ̂ remains). x is restricted to a subspace grown by one direction per step — the
EK-FAC-preconditioned gradient of S (preparation from 128 samples) — with H_S products stored, so the quadratic
term is exact on the subspace. The first ``KRYLOV`` directions are a preconditioned Krylov solve of the plain influence
update; each later step re-linearises the new samples at x, solves the Galerkin system and line-searches S on the
new samples. Per step: one H_S product (|S| samples), one gradient of the new samples, a few forwards of them —
nothing over the other n samples. Costs are counted by the method accounting's pass counter, as every method's
are; scoring (held-out accuracy, edited-set loss, KL to the retrained adapter) as ``frontier.py`` does.

Sizes (``--sizes``; the committed run: 500,4000,8000): the demo's digits RC at n = 500 and the scaling scenario
above it (the same 100 corrections among n pairs, built as ``scaling.py`` builds them). Trials: |S| = 128, λ ∈ {the preparation's auto λ (0.003 ×
top eigenvalue), 0.1, 0.2}; 10 Krylov directions then 5 steps. Outputs ``subspace_surrogate.{json,md}``.

``--trials`` replaces the trials (a JSON list of {"s": pairs or 0 for the whole training set, "damping": "auto" or a
number}) and ``--name`` the output files' stem. The second committed run asks whether the sub-sample's noise or the
quadratic model itself limits the quality, at n = 8000: ``--sizes 8000 --name subspace_surrogate_s --trials``
with |S| ∈ {128, 256, 512, 1024, all 8000} at the auto λ and |S| = 512 at λ ∈ {0.1, 0.01, 0.003}.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import finish, stamp  # noqa: E402
from frontier import Scenario, engine_for, measure_retraining  # noqa: E402
from scaling import extra_samples  # noqa: E402

from mmerase.methods import Checkpoints, SurrogateConfig, unlearn  # noqa: E402
from mmerase.scenarios import ScenarioConfig, build_scenarios, stage  # noqa: E402

NAME = "subspace_surrogate"
TRIALS = [{"s": 128, "damping": "auto"}, {"s": 128, "damping": 0.1}, {"s": 128, "damping": 0.2}]
KRYLOV, STEPS, PREP_SAMPLES, BATCH = 10, 5, 128, 128


def run_trial(sc: Scenario, trial: dict[str, Any], seed: int) -> dict[str, Any]:
    """``mmerase unlearn --method surrogate`` with this trial's |S| and λ: every step's cost (passes, CPU; scoring
    excluded) and score."""
    torch.manual_seed(seed)
    bundle, engine = engine_for(sc, "influence")
    config = SurrogateConfig(samples=trial["s"], damping=trial["damping"], krylov=trial.get("krylov", KRYLOV),
                             steps=trial.get("steps", STEPS),
                             prep_samples=PREP_SAMPLES, batch_size=BATCH, seed=seed,
                             anchored=trial.get("anchored", False))
    snapshots, t_cpu = [], time.process_time()

    def keep(info: Any) -> None:
        cost = {"step": info.step, "sample_passes": info.sample_passes, "cpu_s": time.process_time() - t_cpu}
        snapshots.append((cost, [p.detach().clone() for p in engine.params]))

    theta_hat = [p.detach().clone() for p in engine.params]
    result = unlearn(engine, None, [r.edit for r in sc.requests], "surrogate", config,
                     retrain_passes=sc.retrain_passes, checkpoints=Checkpoints(keep), apply=False)
    points = []
    for cost, theta in snapshots:
        engine.set_parameters(theta)
        points.append({**cost, "fraction": cost["sample_passes"] / sc.retrain_passes, **sc.score(bundle)})
    engine.set_parameters(theta_hat)
    return {"params": trial, "damping": result.info["damping"], "points": points}


def scenario_pickle(n: int, work: Path, task: str = "rc") -> Path:
    """Where :func:`scenario` keeps the built scenario's files (``Scenarios``, pickled) for ``task`` at ``n``."""
    return work / (f"n{n}.pkl" if task == "rc" else f"n{n}-qm-ir.pkl")


def scenario(n: int, work: Path, seed: int, task: str = "rc") -> Scenario:
    """The demo's digits scenario ``task`` at n = 500, the scaling scenario's above (built once into ``work``; QM and
    IR are built together, sharing one base, RC on its own as the committed RC runs built it)."""
    tasks = ("rc",) if task == "rc" else ("qm", "ir")
    cfg = ScenarioConfig(seed=seed, device="cpu", progress=False, tasks=tasks)
    pick = scenario_pickle(n, work, task)
    stem = pick.stem
    if pick.is_file():
        files = pickle.loads(pick.read_bytes())
    else:
        with stage(f"n = {n}: scenario {'/'.join(tasks)}"):
            files = build_scenarios(work / stem, cfg, extra_samples(cfg, n) if n > 500 else ())
        pick.write_bytes(pickle.dumps(files))
    return Scenario(f"digits-{task}-n{n}", files, task, cfg)


def _cell(p: dict[str, Any]) -> str:
    rec = "—" if p["recovery_test_acc"] is None else f"{p['recovery_test_acc']:.2f}"
    val = "—" if p["recovery_validation_acc"] is None else f"{p['recovery_validation_acc']:.2f}"
    return (f"{val} · {rec} · {p['recovery_edited_loss']:.2f} · {p['row']['kl_validation']:.3f} · "
            f"{p['row']['kl_test']:.3f} · {p['fraction']:.3f}")


def render(report: dict[str, Any], out: Path) -> None:
    scaling_json = Path(__file__).resolve().parent / "scaling.json"
    finetune = {s["n"]: s["chosen"].get("finetune", {}) for s in json.loads(scaling_json.read_text())["sizes"]}
    name = report.get("name", NAME)
    run = f"`{NAME}.py`" if name == NAME else f"`{NAME}.py --name {name}`"
    lines = [f"# A refinement whose cost does not grow with n: --method surrogate ({run})", "",
             f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores); torch "
             f"{report['versions'].get('torch')}, transformers {report['versions'].get('transformers')}; seed "
             f"{report['seed']}; {report['date']}; {report['seconds'] / 60:.0f} min. Digits RC (100 corrected "
             f"answers); {KRYLOV} preconditioned Krylov directions, then {STEPS} re-linearised steps.", "",
             "Cell: validation-accuracy recovery · test-accuracy recovery · edited-loss recovery · KL to retrained "
             "on validation · on test · sample passes as a fraction of one retraining.", ""]
    for size in report["sizes"]:
        rows = size["rows"]
        lines += [f"## n = {size['n']} (one retraining {size['retrain_passes']} passes, {size['retraining']['cpu_s']:.1f} "
                  f"CPU s; corrupted adapter: KL to retrained {rows['corrupted']['kl_validation']:.3f} / "
                  f"{rows['corrupted']['kl_test']:.3f})", "",
                  "| trial (S, λ) | λ used | " + " | ".join(f"step {k}" for k in range(1, STEPS + 2)) + " |",
                  "|---|---|" + "---|" * (STEPS + 1)]
        for t in size["trials"]:
            s = t["params"]["s"]
            s = f"all {size['n']}" if not 0 < s < size["n"] else s
            lines.append(f"| {s} samples, λ {t['params']['damping']} | {t['damping']:.3g} | "
                         + " | ".join(_cell(p) for p in t["points"]) + " |")
        ft = finetune.get(size["n"], {})
        if ft:
            lines += ["", "The tuned warm-started fine-tune on the same scenario (`scaling.json`, learning rate chosen "
                      "per budget on validation): " + "; ".join(
                          f"≤ {float(b):.0%}: {_cell(p)}" for b, p in ft.items()) + "."]
        lines.append("")
    (out / f"{name}.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="500,4000", help="training-set sizes (500: the demo's RC)")
    p.add_argument("--trials", type=json.loads, default=TRIALS, help='JSON list of {"s": 128, "damping": "auto"}')
    p.add_argument("--name", default=NAME, help="the output files' stem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--work", type=Path, default=Path("/tmp/mmerase-surrogate"))
    p.add_argument("--report-only", type=Path, default=None, help="re-render the table from a JSON")
    args = p.parse_args(argv)
    if args.report_only is not None:
        render(json.loads(args.report_only.read_text()), args.out)
        return 0
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    t0, report = time.perf_counter(), {"seed": args.seed, "name": args.name, "trials": args.trials, "sizes": []}
    for n in (int(x) for x in args.sizes.split(",")):
        sc = scenario(n, args.work, args.seed)
        size = {"n": n, "rows": sc.rows, "retrain_passes": sc.retrain_passes,
                "retraining": measure_retraining(sc, Path(tempfile.mkdtemp(dir=args.work))), "trials": []}
        for trial in args.trials:
            with stage(f"n = {n}: {json.dumps(trial)}"):
                size["trials"].append(run_trial(sc, trial, args.seed))
        report["sizes"].append(size)
    return finish(stamp(report, t0), args.out, args.name, render)


if __name__ == "__main__":
    sys.exit(main())
