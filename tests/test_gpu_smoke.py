"""benchmarks/gpu_smoke.py, the GPU smoke check: on a machine with CUDA the whole check runs (here it is skipped,
saying why); on the CPU a few of its cases run, so that the script itself keeps working between GPU runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch


def _smoke():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: run `python benchmarks/gpu_smoke.py` "
                    "on a GPU machine (benchmarks/README.md, GPU smoke check)")
def test_every_case_passes_on_the_gpu(tmp_path):
    out = tmp_path / "smoke"
    assert _smoke().main(["--out", str(out)]) == 0
    rep = json.loads((out / "gpu_smoke.json").read_text())
    assert rep["failed"] == 0 and all(r["delta_rel_diff_vs_cpu"] <= rep["delta_tol"] for r in rep["cases"]
                                      if "delta_rel_diff_vs_cpu" in r)


def test_the_script_runs_its_cases_on_the_cpu(tmp_path):
    out = tmp_path / "smoke"
    cases = "llama: finetune,llama: cg ggn,llama: generate"
    assert _smoke().main(["--device", "cpu", "--out", str(out), "--cases", cases]) == 0
    rep = json.loads((out / "gpu_smoke.json").read_text())
    assert [r["case"] for r in rep["cases"]] == ["llama: finetune", "llama: finetune tiny LoRA",
                                                 "llama: cg ggn, damping 0.5", "llama: generate"]
    assert all(r["status"] == "ok" for r in rep["cases"])
    answers = (out / "work" / "llama" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 24 and rep["card"]["device"] == "cpu"
    assert (out / "work" / "llama" / "cg-ggn" / "mmerase_record.json").is_file()
