"""The Taylor-error benchmark (issue 6) in its smoke mode: on the convex model the influence update's error against
exact retraining grows with the edited fraction, Newton refinement removes most of it, the iterates it reconstructs
from one refined solve equal separate solves, and the report has every row (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_taylor_error", BENCH / "taylor_error.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("taylor")
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--smoke", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    for name in ("taylor_error.json", "taylor_error.md", "taylor_error.png"):
        assert (out / name).stat().st_size > 0, name
    return json.loads((out / "taylor_error.json").read_text()), mod


def _err(rows, kind, k, steps):
    (row,) = [r for r in rows if r["edit"] == kind and r["k"] == k and r["refine_steps"] == steps]
    return row["rel_error_retrain"]


def test_every_row_is_there_and_finite(report):
    rep, mod = report
    c = rep["convex"]
    n = c["n_train"]
    assert c["counts"] == mod._counts(n, mod.SMOKE_FRACTIONS) == [3, 15, 90]
    keys = {(r["edit"], r["k"], r["refine_steps"], r["draw"]) for r in c["rows"]}
    assert keys == {(e, k, s, 0) for e in ("flip", "remove") for k in c["counts"] for s in range(3)}
    assert len(c["rows"]) == len(keys)
    for r in c["rows"]:
        for key in ("rel_error_retrain", "stationarity_gap", "test_acc", "retrain_norm"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["fraction"] == r["k"] / n and r["residual"] < 1e-10
    assert "machine" in rep and rep["versions"]["torch"]


def test_error_grows_with_the_edited_fraction(report):
    rows = report[0]["convex"]["rows"]
    for kind in ("flip", "remove"):
        errs = [_err(rows, kind, k, 0) for k in (3, 15, 90)]
        assert errs[0] < errs[1] < errs[2], (kind, errs)
    assert _err(rows, "flip", 90, 0) > 0.5  # a 30% label flip is far outside the first-order regime


def test_two_refinement_steps_remove_most_of_the_error(report):
    rows = report[0]["convex"]["rows"]
    # label flips leave the logistic loss's curvature unchanged, so the Newton steps converge quadratically
    assert _err(rows, "flip", 15, 2) < 0.01 < 0.1 < _err(rows, "flip", 15, 0)  # 5% flip, as tests/test_engine.py
    assert _err(rows, "flip", 3, 2) < 1e-3 * _err(rows, "flip", 3, 0)
    # removals change the curvature that the steps do not see: slower, still a large factor at 1% and 5%
    for k in (3, 15):
        assert _err(rows, "remove", k, 2) < _err(rows, "remove", k, 0) / 5
    gaps = {s: [r["stationarity_gap"] for r in rows if r["edit"] == "flip" and r["k"] == 15
                and r["refine_steps"] == s][0] for s in range(3)}
    assert gaps[0] > gaps[1] > gaps[2]


def test_iterates_from_one_refined_solve_equal_separate_solves(report):
    assert report[0]["convex"]["reconstruction_max_rel_diff"] < 1e-12
