"""`mmerase demo` in its reduced size: real digit images, every artefact written, and the unlearned adapter moves
the edited samples' loss the right way (issue 4)."""

import json

import pytest

from mmerase.cli import main


def test_quick_demo_writes_its_report_and_recovers(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--task", "rc", "--out", out, "--damping", "0.1", "--solver", "cg",
                 "--preparation", "none", "--residual-samples", "none", "--curvature", "ggn", "--refine-steps", "0",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    for name in ("report.md", "report.json", "report.png", "data/train_rc.json", "data/edits_rc.jsonl",
                 "adapters/corrupted-labels/adapter_model.safetensors",
                 "adapters/unlearned-rc/mmerase_record.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    rc = report["scenarios"]["rc"]
    assert rc["n_edits"] == 24 and report["sizes"]["train"] == 120
    rows = rc["rows"]
    # the corrected answers: the unlearned adapter's loss on them falls, towards the retrained adapter's
    assert rows["corrupted"]["edited_loss"] > rows["retrained"]["edited_loss"]
    assert rows["mmerase"]["edited_loss"] < rows["corrupted"]["edited_loss"]
    assert rc["recovery_edited_loss"] > 0.2
    assert rc["residual"] < 1e-2 and rc["converged"]
    md = (out / "report.md").read_text()
    assert "| retrained |" in md and "| mmerase |" in md and "recovery" in md
    # what the unlearning cost, from the run record's accounting, against this run's retraining
    record = json.loads((out / "adapters/unlearned-rc/mmerase_record.json").read_text())
    cost = rc["cost"]
    assert cost["sample_passes"] == record["accounting"]["sample_passes"] > 0 and cost["preparation"] is None
    assert cost["retraining_fraction"] == pytest.approx(cost["sample_passes"] / (4 * 120))  # quick: 4 epochs × 120
    assert cost["cpu_s"] > 0 and cost["retrain_cpu_s"] > 0 and "× one retraining's" in md
    # the grid: edited pairs, the answer they were trained on, and what each adapter now says
    assert len(rc["grid"]) == 4 and all(set(g["answers"]) == {"corrupted", "retrained", "mmerase"} for g in rc["grid"])
    assert all(g["trained_answer"] != g["true_answer"] for g in rc["grid"])
    assert all((out / "data" / g["image"]).is_file() for g in rc["grid"])
    assert (out / "report.png").stat().st_size > 20_000
    assert f"demo report written to {out}" in capsys.readouterr().out


def test_quick_demo_removal_raises_the_forgotten_samples_loss(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--task", "ir", "--out", out, "--damping", "0.1", "--solver", "cg",
                 "--preparation", "none", "--residual-samples", "none", "--curvature", "ggn", "--refine-steps", "0",
                 "--no-progress"]) == 0
    ir = json.loads((out / "report.json").read_text())["scenarios"]["ir"]
    rows = ir["rows"]
    assert rows["retrained"]["forget_loss"] > rows["corrupted"]["forget_loss"]
    assert rows["mmerase"]["forget_loss"] > rows["corrupted"]["forget_loss"]
    assert ir["recovery_forget_loss"] > 0.2


def test_quick_demo_default_prepares_once_per_adapter_and_counts_it(tmp_path):
    """The default path: one preparation for the corrupted-labels adapter serves RC and IR (both unlearn with it),
    and each scenario's cost is its request plus that whole preparation; the updates move the right way."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--task", "rc,ir", "--out", out, "--refine-steps", "3", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["preparations"]) == ["corrupted-labels"]
    prep = json.loads((out / "adapters/prep-corrupted-labels/preparation.json").read_text())
    assert prep["kind"] == "ekfac" and report["preparations"]["corrupted-labels"]["damping"] == prep["damping"]
    for task in ("rc", "ir"):
        sc = report["scenarios"][task]
        record = json.loads((out / f"adapters/unlearned-{task}/mmerase_record.json").read_text())
        assert record["prepared"]["path"].endswith("prep-corrupted-labels") and record["solver"]["method"] == "prepared"
        assert record["damping"]["used"] == prep["damping"]  # 'auto' with a preparation: its λ
        assert sc["cost"]["sample_passes"] == pytest.approx(record["accounting"]["sample_passes"]
                                                            + prep["accounting"]["sample_passes"])
    rc, ir = report["scenarios"]["rc"]["rows"], report["scenarios"]["ir"]["rows"]
    assert rc["mmerase"]["edited_loss"] < rc["corrupted"]["edited_loss"]
    assert ir["mmerase"]["forget_loss"] > ir["corrupted"]["forget_loss"]


def test_demo_defaults_are_one_source():
    """DemoConfig, `mmerase demo`'s command-line defaults and configs/demo.yaml are the same settings."""
    from pathlib import Path

    from mmerase.cli import COMMANDS, _parse, config_values
    from mmerase.demo import DEMO_SOLVER, DemoConfig

    root = Path(__file__).resolve().parents[1]
    cfg = DemoConfig()
    assert {k: getattr(cfg.solver, k) for k in DEMO_SOLVER} == DEMO_SOLVER
    demo = next(c for c in COMMANDS if c.name == "demo")
    assert demo.configs(_parse(demo, []))[DemoConfig] == cfg  # the command line's defaults, solver included
    yaml_file = str(root / "configs" / "demo.yaml")
    assert config_values(yaml_file, demo) and demo.configs(_parse(demo, ["--config", yaml_file]))[DemoConfig] == cfg


def test_demo_defaults_are_the_comparisons_validation_choice():
    """The demo runs exactly the setting benchmarks/frontier.py chose on validation by its stated rule, and the
    committed demo report's preparations have the λ that the comparison's run of that setting had: the same
    scenarios and the same rule (a demo whose λ rule drifted from the validated one would differ)."""
    from pathlib import Path

    from mmerase.demo import DemoConfig

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    rep = json.loads((root / "frontier.json").read_text())
    choice, cfg = rep["demo_choice"], DemoConfig()
    params = choice["params"]
    assert (cfg.preparation, cfg.preparation_damping_scale) == (params["prepare"]["kind"],
                                                                params["prepare"]["damping_scale"])
    solver = {k: v for k, v in params.items() if k != "prepare"}
    assert {k: getattr(cfg.solver, k) for k in solver} == solver
    assert cfg.solver.refine_steps == choice["newton_steps"] - 1 and cfg.solver.batch_size == 128
    demo = json.loads((root / "demo_report.json").read_text())
    for task, adapter in (("rc", "corrupted-labels"), ("qm", "corrupted-images")):
        trial = next(t for t in rep["scenarios"][f"digits-{task}"]["trials"] if t["params"] == params)
        assert demo["preparations"][adapter]["damping"] == pytest.approx(trial["preparation_damping"], rel=1e-6)
        assert demo["scenarios"][task]["damping"] == pytest.approx(trial["preparation_damping"], rel=1e-6)
