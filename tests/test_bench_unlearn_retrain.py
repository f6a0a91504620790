"""The unlearn-vs-retrain benchmark (issue 9, item 3): its smoke run yields every scenario and sweep point with
finite recovery ratios and the edit counts asked for, and its augmented digits are real transformed images with
the right labels (results only; no timing assertions)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmerase.data import digit_images

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _augment as aug  # noqa: E402
import unlearn_vs_retrain as uvr  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("uvr")
    try:
        assert uvr.main(["--smoke", "--out", str(out), "--work", str(out / "work")]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "unlearn_vs_retrain.json").read_text())


def test_augmented_digits_are_transformed_originals_with_their_labels():
    images, targets = digit_images()
    pool = [5, 17, 300, 1200]
    digits = aug.augmented_digits(pool, 11, seed=3)
    assert len(digits) == 11 and len({d.id for d in digits}) == 11
    assert [d.source for d in digits[:4]] == pool and all(d.round == 0 for d in digits[:4])
    assert [d.round for d in digits[4:]] == [1, 1, 1, 1, 2, 2, 2]
    for d in digits:
        assert d.label == targets[d.source]
        orig = np.asarray(images[d.source], dtype=float)
        img = np.asarray(d.image, dtype=float)
        assert img.shape == orig.shape == (16, 16, 3)
        if d.round == 0:
            assert np.array_equal(img, orig)
            continue
        assert np.abs(img - orig).sum() > 0, "an augmented copy equals its original"
        assert abs(d.rotation) <= aug.MAX_ROTATION and max(map(abs, d.shift)) <= aug.MAX_SHIFT
        # it is that transform of that original (not noise, not another digit), and keeps most of the ink
        assert np.array_equal(img, np.asarray(aug.transform(images[d.source], d.rotation, d.shift), dtype=float))
        assert 0.5 < img.sum() / orig.sum() < 1.5
    # deterministic, and a larger set extends a smaller one
    again = aug.augmented_digits(pool, 7, seed=3)
    assert [(d.id, d.rotation, d.shift) for d in again] == [(d.id, d.rotation, d.shift) for d in digits[:7]]


def test_smoke_run_has_every_point_with_finite_recovery(smoke):
    out, rep = smoke
    cfg = rep["config"]
    for name in ("unlearn_vs_retrain.json", "unlearn_vs_retrain.md", "unlearn_vs_retrain.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert not (out / "unlearn_vs_retrain.partial.json").exists()
    points, sw = rep["points"], rep["sweeps"]
    # the default point: every scenario with cold, preconditioned and prepared answers
    assert sorted(points[k]["task"] for k in sw["default"]) == ["ir", "qm", "rc"]
    rates = [float(r) for r in cfg["rates"].split(",")]
    assert sorted((points[k]["task"], points[k]["rate"]) for k in sw["corruption"]) == \
        sorted((t, r) for t in ("rc", "qm", "ir") for r in rates)
    assert [points[k]["n"] for k in sw["size"]] == [int(n) for n in cfg["sizes"].split(",")]
    assert [points[k]["k"] for k in sw["edits"]] == [int(k) for k in cfg["edits"].split(",")]
    assert [points[k]["k"] for k in sw["requests"]] == [int(k) for k in cfg["requests"].split(",")]
    expect = {"default": {"cold", "pcg", "prepared"}, "requests": {"prepared"}, "corruption": {"cold"}, "size": {"cold", "pcg", "prepared"},
              "edits": {"cold", "pcg", "prepared"}}
    for sweep, keys in sw.items():
        for key in keys:
            p = points[key]
            assert expect[sweep] <= set(p["answers"]), (sweep, key)
            assert p["retrained"]["seconds"] > 0 and p["corrupted"]["eval"]["edited_loss"] > 0
            for role, a in p["answers"].items():
                # the request holds exactly the edits asked for
                assert a["n_edits"] == p["k"], (key, role)
                assert math.isfinite(a["recovery"]["edited_loss"]), (key, role)
                assert math.isfinite(a["residual"]) and a["steps"] >= 1
                assert 0 <= a["eval"]["test_acc"] <= 1 and a["memory"]["peak_mib"] > 0
    for key in sw["default"]:
        p = points[key]
        cold, pcg = p["answers"]["cold"], p["answers"]["pcg"]
        before, after = p["corrupted"]["eval"]["edited_loss"], cold["eval"]["edited_loss"]
        # removal raises the forgotten pairs' loss (to first order by ‖Σ_E ∇L‖²_(H+λI)⁻¹ / n > 0), correction lowers
        # the corrected pairs' loss: a sign error in the update fails both
        if p["task"] == "ir":
            assert after > before, key
        elif p["task"] == "rc":
            assert after < before, key
        retrained = p["retrained"]["eval"]["edited_loss"]
        assert cold["recovery"]["edited_loss"] == pytest.approx((after - before) / (retrained - before), rel=1e-12)
        # preconditioned CG solves the same system: the same answer to the solver's tolerance
        assert pcg["eval"]["edited_loss"] == pytest.approx(cold["eval"]["edited_loss"], rel=1e-3), key
        assert pcg["damping"] == pytest.approx(cold["damping"], rel=1e-9), key  # 'auto': the preparation's λ
    # corruption rates set the number of edits; size points above the sub-sample use it
    for key in sw["corruption"]:
        p = points[key]
        assert p["k"] == p["n_corrupted"] == max(1, round(p["rate"] * p["n"]))
    for key in sw["size"]:
        p = points[key]
        assert p["k"] == round(cfg["default_rate"] * cfg["default_n"])
        want = cfg["curvature_samples"] if cfg["curvature_samples"] < p["n"] else None
        assert p["curvature_samples"] == want
        assert p["answers"]["cold"]["curvature_set"] == (want or p["n"])
    # the largest size has augmented copies (the pool is smaller), and a full-data cold solve where asked
    big = points[sw["size"][-1]]
    assert big["n"] > rep["sizes"]["pool"] and "cold-full" in big["answers"]
    assert big["answers"]["cold-full"]["curvature_set"] == big["n"]
    # every bar is stated, and the tables name the machine
    assert {"recovery_rc", "recovery_qm", "flat_cold", "prepared_50x"} <= set(rep["bars"])
    md = (out / "unlearn_vs_retrain.md").read_text()
    assert rep["machine"]["cpu"] in md and "## Bars" in md and "| retrained |" in md
    assert md.count("**met**") + md.count("**missed**") == 5


def test_report_renders_from_a_partial_result(smoke, tmp_path):
    out, rep = smoke
    partial = {**rep, "sweeps": {**rep["sweeps"], "edits": [], "corruption": []}}
    partial.pop("bars")
    src = tmp_path / "partial.json"
    src.write_text(json.dumps(partial))
    assert uvr.main(["--report-only", str(src), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "unlearn_vs_retrain.md").read_text()
    assert "## Training-set size" in md and "## Number of edits" not in md
    assert (tmp_path / "r" / "unlearn_vs_retrain.png").is_file()
