"""benchmarks/frontier.py in its smoke size: every method runs on both kinds of scenario, every chosen point keeps
to its budget and is the validation-best within it, and recoveries follow from the rows (results only)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def frontier(tmp_path_factory):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"
    spec = importlib.util.spec_from_file_location("bench_frontier", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("frontier")
    assert mod.main(["--smoke", "--out", str(out)]) == 0
    return mod, json.loads((out / "frontier.json").read_text()), out


def test_every_method_runs_and_every_budget_is_respected(frontier):
    mod, rep, out = frontier
    assert set(rep["scenarios"]) == {"digits-rc", "spell-rc"}
    for name, sc in rep["scenarios"].items():
        assert {t["method"] for t in sc["trials"]} == set(mod.METHODS), name
        assert all(t["error"] is None and t["points"] for t in sc["trials"]), name
        for t in sc["trials"]:
            fractions = [p["fraction"] for p in t["points"]]
            assert fractions == sorted(fractions) and all(math.isfinite(p["row"]["test_acc"]) for p in t["points"])
            if t["method"] != "influence":  # a gradient method never spends more than its largest budget
                assert fractions[-1] <= max(mod.BUDGETS) + 1e-9
        for method, per in sc["chosen"].items():
            for budget, p in per.items():
                assert p["fraction"] <= float(budget) + 1e-9, (name, method, budget)
                assert math.isfinite(p["recovery_test_acc"]) and p["cpu_fraction"] > 0
        # gradient methods have points from 10% up on the quick scenarios
        assert all(str(b) in sc["chosen"][m] for m in mod.METHODS[1:] for b in (0.3, 1.0)), name


def test_choices_are_the_validation_best_and_recoveries_follow_from_rows(frontier):
    mod, rep, _ = frontier
    for name, sc in rep["scenarios"].items():
        c, r = sc["rows"]["corrupted"], sc["rows"]["retrained"]
        for method, per in sc["chosen"].items():
            for budget, p in per.items():
                within = [t["points"] for t in sc["trials"] if t["method"] == method]
                last = [[q for q in pts if q["fraction"] <= float(budget) + 1e-9][-1] for pts in within
                        if any(q["fraction"] <= float(budget) + 1e-9 for q in pts)]
                assert p["recovery_validation_acc"] == max(q["recovery_validation_acc"] for q in last)
                want = (p["row"]["test_acc"] - c["test_acc"]) / (r["test_acc"] - c["test_acc"])
                assert p["recovery_test_acc"] == pytest.approx(want, rel=1e-12)


def test_the_demo_choice_follows_the_stated_rule(frontier):
    mod, rep, _ = frontier
    choice, trial = rep["demo_choice"], rep["scenarios"]["digits-rc"]["trials"][0]
    last = [p for p in trial["points"] if p["fraction"] <= mod.DEMO_BUDGET][-1]
    assert choice["params"] == trial["params"] == mod.trials_for(True)["influence"][0]
    assert choice["newton_steps"] == last["step"] and choice["validation_score"] == last["recovery_validation_acc"]


def test_report_and_plot(frontier):
    mod, rep, out = frontier
    md = (out / "frontier.md").read_text()
    assert "## digits-rc" in md and "## spell-rc" in md and "| influence |" in md
    assert (out / "frontier.png").stat().st_size > 10_000 and not (out / "frontier.partial.json").exists()


def _module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"
    spec = importlib.util.spec_from_file_location("bench_frontier_spread", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(seed: int, rc: dict, ir: float | None) -> dict:
    chosen_ir = {"influence": {"10.0": {"forget_loss_rel_diff": ir}}} if ir is not None else {"influence": {}}
    return {"config": {"seed": seed, "budgets": [0.1, 1.0], "influence_extra": [10.0]},
            "scenarios": {"digits-rc": {"chosen": {m: {b: {"recovery_test_acc": v} for b, v in per.items()}
                                                   for m, per in rc.items()}},
                          "digits-ir": {"chosen": chosen_ir}}}


def test_spread_over_seeds_is_mean_min_max_of_each_chosen_cell():
    """--spread: each cell is mean (min – max) over the runs; a cell missing in any run stays empty."""
    mod = _module()
    runs = [_run(0, {"finetune": {"0.1": 0.2, "1.0": 1.3}, "influence": {"10.0": 0.6}}, 0.05),
            _run(1, {"finetune": {"0.1": 0.4, "1.0": 0.7}, "influence": {"10.0": 0.9}}, 0.15),
            _run(2, {"finetune": {"0.1": 0.0}, "influence": {"10.0": 0.9}}, None)]
    text = mod.spread_markdown(runs)
    assert "seeds [0, 1, 2]" in text
    assert "| finetune | 0.20 (0.00 – 0.40) |  |  |" in text  # the 100% cell is missing in seed 2's run
    assert "| influence |  |  | 0.80 (0.60 – 0.90) |" in text
    assert "| influence |  |  |  |" in text  # IR: seed 2 has no point at 1000%
    assert mod.spread_markdown(runs[:2]).count("| influence |  |  | 0.10 (0.05 – 0.15) |") == 1
