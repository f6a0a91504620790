"""benchmarks/surrogate_seeds.py's choice for IR on half the removed pairs: the point chosen is the one nearest the
retrained adapter on the first half, and the figure reported is the distance on the second half alone (so a point
that is near on the chosen half only is not rewarded). Hand-built trials, checked against plain arithmetic."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

RETRAINED = [2.0, 1.0, 4.0, 3.0]  # pairs 0 and 2 (first half): mean 3.0; pairs 1 and 3 (second half): mean 2.0


@pytest.fixture(scope="module")
def seeds_mod():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "surrogate_seeds.py"
    spec = importlib.util.spec_from_file_location("bench_surrogate_seeds", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def point(fraction: float, losses: list[float], kl: float) -> dict:
    row = {"forget_losses": losses, "forget_loss": sum(losses) / len(losses), "kl_validation": kl, "kl_test": kl}
    return {"fraction": fraction, "row": row, "recovery_forget_loss": 0.0,
            "forget_loss_rel_diff": abs(row["forget_loss"] - 2.5) / 2.5}


def report(select: str) -> dict:
    # trial a: exact on the first half (3.0), off on the second (2.6); the larger validation KL
    # trial b: off on the first half (3.3), exact on the second (2.0)
    a = {"params": {"lr": 1e-4}, "points": [point(0.1, [3.0, 2.6, 3.0, 2.6], 0.02)]}
    b = {"params": {"lr": 3e-4}, "points": [point(0.1, [3.3, 2.0, 3.3, 2.0], 0.01)]}
    seed = {"seed": 0, "rows": {"retrained": {"forget_losses": RETRAINED, "forget_loss": 2.5}},
            "trials": {"finetune": [a, b]}}
    return {"task": "ir", "select": select, "seeds": [seed]}


def test_forget_half_chooses_on_the_first_half_and_reports_the_second(seeds_mod):
    rep = seeds_mod.with_choices(report("forget-half"))
    seed = rep["seeds"][0]
    chosen = seed["chosen"]["finetune"]["0.1"]
    assert chosen["params"] == {"lr": 1e-4}  # |3.0 − 3.0| / 3 = 0 against |3.3 − 3.0| / 3 = 0.1
    ref = seeds_mod.reference(rep, seed)
    assert seeds_mod.headline(chosen, "ir", ref) == pytest.approx(abs(2.6 - 2.0) / 2.0)
    assert seeds_mod.headline(chosen, "ir", None) == pytest.approx(abs(2.8 - 2.5) / 2.5)


def test_kl_selection_is_unchanged_without_the_option(seeds_mod):
    rep = seeds_mod.with_choices(report("kl"))
    assert rep["seeds"][0]["chosen"]["finetune"]["0.1"]["params"] == {"lr": 3e-4}  # the smaller validation KL
    rep = report("kl")
    rep["seeds"][0]["trials"]["finetune"][1]["points"][0]["row"]["kl_validation"] = 0.03
    assert seeds_mod.with_choices(rep)["seeds"][0]["chosen"]["finetune"]["0.1"]["params"] == {"lr": 1e-4}
    assert json.loads(json.dumps(rep))["seeds"][0]["chosen"]["finetune"]["0.1"]["fraction"] == 0.1


def test_means_of_a_joined_report_are_over_the_seeds_that_measured_each_method(seeds_mod):
    # seed 0 measured the fine-tune and "surrogate"; seed 1 the fine-tune only (a later run without that variant)
    first, second = report("forget-half"), report("forget-half")
    first["seeds"][0]["trials"]["surrogate"] = [
        {"params": {"s": 128}, "points": [point(0.1, [3.0, 2.4, 3.0, 2.4], 0.02)]}]
    second["seeds"][0]["seed"] = 1
    second["seeds"][0]["trials"]["finetune"][0]["points"][0]["row"]["forget_losses"] = [3.0, 3.0, 3.0, 3.0]
    rep = seeds_mod.with_choices({"task": "ir", "select": "forget-half", "seeds": first["seeds"] + second["seeds"]})
    rows = {line.split(" | ")[0]: line for line in seeds_mod.mean_rows(rep, "ir") if line.startswith("| ")}
    budgets = list(seeds_mod.REPORT_BUDGETS)
    at_10 = 1 + budgets.index(0.1)
    # the fine-tune over both seeds: (|2.6 − 2| / 2 + |3 − 2| / 2) / 2 = 0.4; the surrogate, seed 0: |2.4 − 2| / 2
    assert rows["| finetune"].split(" | ")[at_10] == "0.40"
    assert rows["| surrogate (seeds 0)"].split(" | ")[at_10] == "0.20"
