"""benchmarks/scaling.py in its smoke size: the training set grows by clean augmented pairs while the request and the
corrupted pairs stay the same, one retraining is epochs × n sample passes, and the reported points follow from the
trials (results only, never timings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmerase.data import load_dataset

SIZES = (120, 170)


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
    spec = importlib.util.spec_from_file_location("bench_scaling", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, work = tmp_path_factory.mktemp("scaling"), tmp_path_factory.mktemp("scaling-work")
    assert mod.main(["--smoke", "--sizes", ",".join(map(str, SIZES)), "--out", str(out), "--work", str(work)]) == 0
    return mod, json.loads((out / "scaling.json").read_text()), out, work


def test_a_larger_training_set_adds_clean_pairs_and_keeps_the_request(scaling):
    _, rep, _, work = scaling
    small, large = (work / f"n{n}" / "data" for n in SIZES)
    train_small, train_large = load_dataset(small / "train_rc.json"), load_dataset(large / "train_rc.json")
    assert [len(train_small), len(train_large)] == list(SIZES)
    # the first 120 pairs (the split's digits, corrupted ones included) are the same; the rest are clean copies
    assert [(s.id, s.response) for s in train_large[:SIZES[0]]] == [(s.id, s.response) for s in train_small]
    clean_large = {s.id: s.response for s in load_dataset(large / "train_clean.json")}
    assert all(clean_large[s.id] == s.response for s in train_large[SIZES[0]:])
    assert all(s.id.startswith("aug") for s in train_large[SIZES[0]:])
    assert (small / "edits_rc.jsonl").read_text() == (large / "edits_rc.jsonl").read_text()
    assert [s["n_edits"] for s in rep["sizes"]] == [24, 24]
    assert [s["retrain_passes"] for s in rep["sizes"]] == [4 * n for n in SIZES]  # quick recipe: 4 epochs


def test_reported_points_follow_from_the_trials(scaling):
    mod, rep, out, _ = scaling
    for size in rep["sizes"]:
        influence = size["trials"][0]
        assert influence["method"] == "influence" and influence["error"] is None
        assert [p["step"] for p in influence["points"]] == list(range(1, len(influence["points"]) + 1))
        goal = mod.cheapest_at_goal(influence)
        reached = [p for p in influence["points"] if p["recovery_edited_loss"] >= mod.GOAL]
        assert goal is (reached[0] if reached else None)
        for budget, p in size["chosen"].get("finetune", {}).items():
            assert p["fraction"] <= float(budget) + 1e-9
    # the cost fit passes through the points when there are two sizes
    a, b = mod.cost_fit(rep)
    for size in rep["sizes"]:
        assert a + b * size["n"] == pytest.approx(size["trials"][0]["points"][-1]["sample_passes"])
    text = (out / "scaling.md").read_text()
    assert all(f"| {n} |" in text for n in SIZES) and (out / "scaling.png").stat().st_size > 0
