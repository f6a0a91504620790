"""The per-family product-cost benchmark (``benchmarks/product_cost.py --families``) in its smoke mode."""

import importlib.util
import json
import math
from pathlib import Path

import torch


def test_family_product_cost_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "product_cost.py"
    spec = importlib.util.spec_from_file_location("product_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--families", "--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "w")]) == 0
    finally:
        torch.set_num_threads(threads)
    rep = json.loads((tmp_path / "product_cost_families.json").read_text())
    assert list(rep["models"]) == list(bench.FAMILY_PRESETS) and len(rep["models"]) == 5
    for model in rep["models"].values():
        rows, info = model["rows"], model["info"]
        assert list(rows) == [op[0] for op in bench.OPS]
        assert all(math.isfinite(row[m]["x_gradient_cpu"]) and row[m]["x_gradient_cpu"] > 0
                   for row in rows.values() for m in ("recompute", "cached"))
        assert all(row["cached_vs_recompute_rel_diff"] < 1e-5 for row in rows.values())
        assert rows["FD-HVP"]["rel_err_vs_exact"] < 1e-2
        lo, hi = info["image_tokens_range"]
        assert lo < hi and info["cached_images"] == info["samples"]  # images of several sizes, each cached once
    assert (tmp_path / "product_cost_families.md").read_text().count("| exact HVP |") == 5
