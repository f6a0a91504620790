"""How close does a retraining come to the retrained adapter? The reference every recovery is measured against.

    python benchmarks/retrain_noise.py [--sizes 500,8000] [--seeds 1,2,3] [--out DIR] [--work DIR]

Every recovery in these benchmarks compares an answer with one retrained adapter: the scenario's LoRA trained on
the clean data with seed 0 (the corrupted adapter shares that seed: its initialisation and batch order). A user who
retrains draws another seed. This script retrains the clean data with other seeds — the same base, data, recipe
and cost — and scores each retraining exactly as the methods are scored (``frontier.Scenario.score``: held-out
accuracy recovery, edited-set loss recovery, KL to the seed-0 retrained adapter). What a real retraining reaches
is the most an unlearning method can be asked for; a target above it measures the seed, not the method.

Scenarios: the demo's digits RC at n = 500 and the scaling scenario above it, built as ``subspace_surrogate.py``
builds them (its ``--work`` folder is reused). Outputs ``retrain_noise.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import finish, stamp  # noqa: E402
from frontier import Scenario  # noqa: E402
from subspace_surrogate import scenario  # noqa: E402

from mmerase.data import load_dataset  # noqa: E402
from mmerase.scenarios import stage, train_scenario_adapter  # noqa: E402

NAME = "retrain_noise"


def retrain(sc: Scenario, seed: int, work: Path) -> dict[str, Any]:
    """One retraining of the clean data with ``seed``, scored against the seed-0 retrained adapter."""
    data = load_dataset(sc.files.data_dir / "train_clean.json")
    out = Path(tempfile.mkdtemp(dir=work)) / "adapter"
    t_cpu = time.process_time()
    train_scenario_adapter(sc.files.base, data, out, dataclasses.replace(sc.cfg, seed=seed))
    return {"seed": seed, "cpu_s": time.process_time() - t_cpu, **sc.score(sc.bundle(out))}


def _f(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def render(report: dict[str, Any], out: Path) -> None:
    lines = [f"# Retraining against the retrained adapter (`{NAME}.py`)", "",
             f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores); torch "
             f"{report['versions'].get('torch')}, transformers {report['versions'].get('transformers')}; "
             f"{report['date']}; {report['seconds'] / 60:.0f} min. Digits RC; the reference is the scenario's "
             "seed-0 retrained adapter; each row retrains the same clean data with another seed.", "",
             "| n | seed | validation rec. | test rec. | edited-loss rec. | KL to retrained, validation / test | CPU s |",
             "|---|---|---|---|---|---|---|"]
    for size in report["sizes"]:
        c = size["rows"]["corrupted"]
        lines.append(f"| {size['n']} | corrupted (seed 0) | 0 | 0 | 0 | {c['kl_validation']:.3f} / {c['kl_test']:.3f} | |")
        for r in size["retrainings"]:
            lines.append(f"| {size['n']} | {r['seed']} | {_f(r['recovery_validation_acc'])} | "
                         f"{_f(r['recovery_test_acc'])} | {_f(r['recovery_edited_loss'])} | "
                         f"{r['row']['kl_validation']:.3f} / {r['row']['kl_test']:.3f} | {r['cpu_s']:.1f} |")
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="500,8000", help="training-set sizes (500: the demo's RC)")
    p.add_argument("--seeds", default="1,2,3", help="the retrainings' seeds (0 is the reference's)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--work", type=Path, default=Path("/tmp/mmerase-surrogate"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    t0, report = time.perf_counter(), {"sizes": []}
    for n in (int(x) for x in args.sizes.split(",")):
        sc = scenario(n, args.work, 0)
        size: dict[str, Any] = {"n": n, "rows": sc.rows, "retrainings": []}
        for seed in (int(s) for s in args.seeds.split(",")):
            with stage(f"n = {n}: retraining with seed {seed}"):
                size["retrainings"].append(retrain(sc, seed, args.work))
        report["sizes"].append(size)
    return finish(stamp(report, t0), args.out, NAME, render)


if __name__ == "__main__":
    sys.exit(main())
