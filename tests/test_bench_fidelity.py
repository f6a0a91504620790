"""benchmarks/fidelity.py in its smoke size: every curvature × damping rule × refinement row is there, the damping
rules and recovery ratios are what they claim, and defaults come from the validation split (issue 6)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmerase.influence.damping import PD_MARGIN


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"
    spec = importlib.util.spec_from_file_location("bench_fidelity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("fidelity")
    assert mod.main(["--smoke", "--out", str(out)]) == 0
    return json.loads((out / "fidelity.json").read_text()), (out / "fidelity.md").read_text(), out


def _ratio(u, c, r):
    return None if abs(r - c) < 1e-12 else (u - c) / (r - c)


def test_every_rule_is_swept_and_follows_the_damping_rule(fidelity):
    rep, _, _ = fidelity
    scales = rep["config"]["scales"]
    assert set(rep["damping"]) == {"ggn", "hessian"}
    for curv, per in rep["damping"].items():
        assert set(per) == {"rc", "qm", "ir"}
        for t, sweep in per.items():
            assert [r["scale"] for r in sweep["rules"]] == scales and sweep["top_eigenvalue"] > 0
            for r in sweep["rules"]:
                floor = PD_MARGIN * -sweep["bottom_ritz_value"] if sweep["bottom_ritz_value"] < 0 else 0.0
                assert r["damping"] == pytest.approx(max(r["scale"] * sweep["top_eigenvalue"], floor))
                assert 0 <= r["residual"] < 1
    # the GGN is PSD: no negative Ritz value; the exact Hessian of this adapter is indefinite, and the guard holds
    assert all(per["bottom_ritz_value"] > -1e-6 for per in rep["damping"]["ggn"].values())
    assert any(per["bottom_ritz_value"] < 0 for per in rep["damping"]["hessian"].values())


def test_recoveries_are_computed_from_the_rows(fidelity):
    rep, _, _ = fidelity
    for curv, per in rep["damping"].items():
        for t, sweep in per.items():
            base = rep["baseline"][t]
            for r in sweep["rules"]:
                for split in ("validation", "test"):
                    key = f"{split}_acc"
                    assert r[f"recovery_{split}_acc"] == _ratio(r["row"][key], base["corrupted"][key],
                                                                base["retrained"][key])
    # the influence update moves the corrected answers' loss towards the retrained adapter's
    rc = rep["damping"][rep["chosen"]["curvature"]]["rc"]["rules"]
    assert all(r["row"]["edited_loss"] < rep["baseline"]["rc"]["corrupted"]["edited_loss"] for r in rc)


def test_defaults_are_chosen_on_validation_and_reported_on_test(fidelity):
    rep, md, out = fidelity
    chosen = rep["chosen"]
    best = max(rep["damping"], key=lambda c: chosen["per_curvature"][c]["validation_score"])
    assert chosen["curvature"] == best and chosen["scale"] in rep["config"]["scales"]
    for t in ("rc", "qm", "ir"):
        steps = rep["refinement"][chosen["curvature"]][t]
        assert 1 <= len(steps) <= 2 and [r["refine_steps"] for r in steps] == list(range(len(steps)))
        assert rep["final"][t] == steps[chosen["refine_steps"]]
    assert "Defaults chosen on validation" in md
    # each bar's verdict follows from the final rows, and the table says that verdict for that scenario
    for t, r in rep["final"].items():
        if t == "ir":
            met = rep["bars"]["ir_forget_loss_within_10pct"]
            assert met == (r["forget_loss_rel_diff"] <= 0.1)
        else:
            met = rep["bars"][f"{t}_test_recovery_ge_0.8"]
            assert met == (r["recovery_test_acc"] is not None and r["recovery_test_acc"] >= 0.8)
        row = next(line for line in md.splitlines() if line.startswith(f"| {t.upper()} | {100 * r['row']['test_acc']:.1f}%"))
        assert row.endswith("| met |") if met else "| **missed**" in row
    assert (out / "fidelity.png").stat().st_size > 1000
