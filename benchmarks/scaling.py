"""A fixed request against growing fine-tunes: what the influence route and a warm-started fine-tune cost and recover
as the training set grows (RC: the same 100 corrected answers in every size).

    python benchmarks/scaling.py [--sizes 500,1000,2000,4000] [--smoke] [--out DIR] [--work DIR] [--resume]

At each size n the demo's digits RC scenario (:func:`mmerase.scenarios.build_scenarios`, seed 0: the same base
recipe, the same 500 split digits of which the same 100 are corrupted) gets n − 500 clean training pairs more:
shifted and rotated copies of the split's digits (``benchmarks/_augment.py``). The request corrects the 100 wrong
answers at every n, so retraining's cost grows with n while the request does not. Methods and trials come from
``benchmarks/frontier.py`` (same code, same accounting, same scoring): influence with the demo's default (an EK-FAC
preparation built in the request, 20 one-step Newton refinements, scored after every step) and the warm-started
fine-tune at the frontier's four learning rates (scored at 3%, 10%, 30% and 100% of one retraining; at each budget
the rate with the best validation recovery, reported on test).

Outputs ``scaling.json`` (every trial and checkpoint per size), ``scaling.md`` and ``scaling.png`` (edited-set loss
recovery against compute, one line per size and method: at n ≥ 2000 the held-out accuracy gap is a few test digits). ``--resume`` keeps the sizes a previous run finished (``OUT/scaling.partial.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _augment import augmented_digits  # noqa: E402
from frontier import BUDGETS, TRIALS, Scenario, choose, measure_retraining, run_trial  # noqa: E402

from mmerase.data import DIGIT_QUESTION, DIGIT_WORDS, Sample  # noqa: E402
from mmerase.record import machine, versions, write_json  # noqa: E402
from mmerase.scenarios import ScenarioConfig, build_scenarios, digit_split, stage  # noqa: E402

NAME = "scaling"
#: the demo's default influence setting (frontier's validated choice) and the fine-tune's learning-rate trials
INFLUENCE = TRIALS["influence"][1]
FINETUNE = TRIALS["finetune"]
#: the quality mark the table reads off the influence curve: recovery of the edited-set loss gap (at n ≥ 2000 the
#: held-out accuracy gap is a few test digits, too coarse to read)
GOAL = 0.8


def extra_samples(cfg: ScenarioConfig, n: int) -> list[Sample]:
    """The n − n_train augmented copies of the split's training digits that extend the training set to n."""
    _, train_idx, _ = digit_split(cfg)
    digits = augmented_digits(train_idx, n, seed=cfg.seed)[len(train_idx):]
    return [Sample(id=d.id, image=d.image, conversations=[{"from": "human", "value": DIGIT_QUESTION},
                                                          {"from": "gpt", "value": DIGIT_WORDS[d.label]}])
            for d in digits]


def cheapest_at_goal(trial: dict[str, Any]) -> dict[str, Any] | None:
    """The first checkpoint whose edited-set loss recovery reaches :data:`GOAL` (a measurement of what reaching it
    costs, read with the retrained adapter's help: not a setting a user could choose this way)."""
    return next((p for p in trial["points"] if (p["recovery_edited_loss"] or -1) >= GOAL), None)


def cost_fit(report: dict[str, Any]) -> tuple[float, float]:
    """Influence's sample passes after its last step ≈ a + b·n (least squares over the sizes): (a, b)."""
    xs = [s["n"] for s in report["sizes"]]
    ys = [s["trials"][0]["points"][-1]["sample_passes"] for s in report["sizes"]]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def measure_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = ScenarioConfig(seed=args.seed, quick=args.smoke, device="cpu", progress=False, tasks=("rc",))
    with stage(f"n = {n}: scenario"):
        files = build_scenarios(args.work / f"n{n}", cfg, extra_samples(cfg, n))
        sc = Scenario(f"digits-rc-n{n}", files, "rc", cfg)
    out: dict[str, Any] = {"n": n, "rows": sc.rows, "retrain_passes": sc.retrain_passes,
                           "n_edits": len(sc.requests), "retraining": measure_retraining(sc, args.work)}
    trials = []
    for method, params in [("influence", INFLUENCE)] + [("finetune", p) for p in FINETUNE[: 1 if args.smoke else None]]:
        params = {**params, "refine_steps": 3} if args.smoke and method == "influence" else params
        with stage(f"n = {n}: {method} {params}"):
            trials.append(run_trial(sc, method, params, args.seed))
    out["trials"] = trials
    out["chosen"] = {m: v for m, v in choose(sc, trials, out["retraining"]).items() if v}
    return out


def table(report: dict[str, Any]) -> list[str]:
    head = ("| n | retraining: passes, CPU s | test gap (digits) | influence, last step | influence, first step with "
            "edited-loss rec ≥ 0.8 | ")
    lines = [head + " | ".join(f"finetune ≤ {b:.0%}" for b in BUDGETS) + " |",
             "|---|---|---|---|---|" + "---|" * len(BUDGETS)]
    for size in report["sizes"]:
        r, rows = size["retraining"], size["rows"]
        gap = round((rows["retrained"]["test_acc"] - rows["corrupted"]["test_acc"]) * report["n_test"])
        points = size["trials"][0]["points"]
        goal = cheapest_at_goal(size["trials"][0])
        ft = size["chosen"].get("finetune", {})
        cells = [_cell(ft.get(str(b))) for b in BUDGETS]
        lines.append(f"| {size['n']} | {r['sample_passes']}, {r['cpu_s']:.1f} | {gap} | "
                     f"{_cell(points[-1] if points else None)} | "
                     + (f"step {goal['step']}: {_cell(goal)}" if goal else "not reached") + " | "
                     + " | ".join(cells) + " |")
    return lines


def _cell(p: dict[str, Any] | None) -> str:
    if p is None:
        return "no point"
    rec = "—" if p["recovery_test_acc"] is None else f"{p['recovery_test_acc']:.2f}"
    cpu = f"/{p['cpu_fraction']:.2f}" if "cpu_fraction" in p else ""
    return (f"{rec} · {p['recovery_edited_loss']:.2f} · {p['row']['kl_test']:.3f} · {p['fraction']:.2f}{cpu}")


def render(report: dict[str, Any], out: Path) -> None:
    lines = [f"# A fixed request against growing fine-tunes (`{NAME}.py`)", "",
             f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores); "
             f"torch {report['versions'].get('torch')}, "
             f"transformers {report['versions'].get('transformers')}; seed {report['seed']}; {report['date']}; "
             f"{report['seconds'] / 60:.0f} min. Digits RC: the same 100 corrected answers at every n "
             f"(n − 500 clean augmented pairs added). Influence: {json.dumps(INFLUENCE)}. Fine-tune: learning rates "
             f"{[p['lr'] for p in FINETUNE]}, chosen per budget on validation.", "",
             "Cell: test-accuracy recovery (1 = retrained) · edited-loss recovery · KL to retrained on test · "
             "sample passes [/ CPU time] as a fraction of one retraining. The fine-tune's learning rate is chosen per "
             "budget on validation accuracy.", ""]
    lines += table(report)
    a, b = cost_fit(report)
    lines += ["", f"Influence's passes after its last step ≈ {a:.0f} + {b:.1f}·n (least squares over the sizes); one "
              f"retraining is {report['sizes'][0]['retrain_passes'] // report['sizes'][0]['n']}·n."]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(report, out / f"{NAME}.png")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, size in enumerate(report["sizes"]):
        color = f"C{i}"
        pts = size["trials"][0]["points"]
        ax.plot([p["fraction"] for p in pts], [p["recovery_edited_loss"] for p in pts], "-o", ms=3, color=color,
                label=f"influence, n={size['n']}")
        ft = size["chosen"].get("finetune", {})
        xs = [b for b in BUDGETS if str(b) in ft]
        ax.plot(xs, [ft[str(b)]["recovery_edited_loss"] for b in xs], "--s", ms=4, color=color,
                label=f"finetune, n={size['n']}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(GOAL, color="grey", lw=0.8, ls=":")
    ax.axvline(0.2, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("compute, × one retraining (sample passes)")
    ax.set_ylabel("edited-set loss recovery (1 = retrained)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="500,1000,2000,4000", help="training-set sizes (each ≥ the split's 500)")
    p.add_argument("--smoke", action="store_true", help="quick scenario sizes, one fine-tune trial, 3 refinements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--work", type=Path, default=Path("/tmp/mmerase-scaling"))
    p.add_argument("--resume", action="store_true", help="keep the sizes in OUT/scaling.partial.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"{NAME}.partial.json"
    report = json.loads(partial.read_text()) if args.resume and partial.is_file() else {"sizes": []}
    report.update(seed=args.seed, n_test=ScenarioConfig(quick=args.smoke).n_test)
    t0 = time.perf_counter() - report.get("seconds", 0.0)
    done = {s["n"] for s in report["sizes"]}
    for n in (int(x) for x in args.sizes.split(",")):
        if n not in done:
            report["sizes"].append(measure_size(n, args))
            report["seconds"] = time.perf_counter() - t0
            write_json(partial, report)
    report.update(machine=machine(), versions=versions(), date=time.strftime("%Y-%m-%d %H:%M %Z"),
                  seconds=time.perf_counter() - t0)
    write_json(args.out / f"{NAME}.json", report)
    render(report, args.out)
    partial.unlink(missing_ok=True)
    print((args.out / f"{NAME}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
