"""The `mmerase` command line end to end on the tiny presets: finetune → unlearn → generate, run records, and
one-line errors with exit code 2 for every mistake a user can make (issue 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import peft
import torch
from safetensors.torch import load_file

from mmerase.cli import main
from mmerase.record import sha256_dir, sha256_file

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _write_text_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i}", "conversations": [{"from": "human", "value": f"Spell {i}"},
                                               {"from": "gpt", "value": WORDS[i % 10]}]} for i in range(16)]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_edits(folder: Path, lines: list[dict]) -> Path:
    path = folder / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def text_run(tiny_llama_dir, tmp_path_factory):
    """finetune → unlearn once; shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    data = _write_text_data(root / "data")
    adapter = root / "adapter"
    assert main(["finetune", "--base", tiny_llama_dir, "--data", data, "--out", adapter, "--epochs", "2",
                 "--lr", "5e-3", "--lora-r", "4", "--batch-size", "4", "--no-progress"]) == 0
    edits = _write_edits(root / "data", [
        {"op": "remove", "id": "q1"},
        {"op": "correct", "id": "q2", "response": "TWO"},
        {"op": "modify", "id": "q3", "query": "Spell three"},
        {"op": "add", "sample": {"id": "new", "conversations": [{"from": "human", "value": "Spell 42"},
                                                                 {"from": "gpt", "value": "forty-two"}]}},
    ])
    before = sha256_dir(adapter), sha256_file(data)
    out = root / "unlearned"
    code = main(["unlearn", "--base", tiny_llama_dir, "--adapter", adapter, "--data", data, "--edits", edits,
                 "--out", out, "--curvature", "ggn", "--damping", "1.0", "--tol", "1e-6", "--max-steps", "60",
                 "--dtype", "float64", "--no-progress"])
    return {"root": root, "data": data, "adapter": adapter, "edits": edits, "out": out, "code": code,
            "before": before}


def test_unlearn_writes_a_new_adapter_and_a_run_record(text_run):
    assert text_run["code"] == 0
    out = text_run["out"]
    assert {"adapter_config.json", "adapter_model.safetensors", "mmerase_record.json"} <= \
        {p.name for p in out.iterdir()}
    rec = json.loads((out / "mmerase_record.json").read_text())
    assert rec["edits"]["sha256"] == sha256_file(text_run["edits"]) and rec["edits"]["n"] == 4
    assert rec["data"]["sha256"] == sha256_file(text_run["data"]) and rec["data"]["n"] == 16
    assert rec["ops"] == {"remove": 1, "correct": 1, "modify": 1, "add": 1}
    assert rec["solver"]["method"] == "cg" and rec["solver"]["curvature"] == "ggn" and rec["solver"]["damping"] == 1.0
    res = rec["result"]
    assert res["converged"] and res["residual"] < 1e-6
    assert res["history"][0]["residual"] == 1.0 and res["history"][-1]["residual"] < 1e-6
    assert {"load_s", "solve_s", "total_s"} <= set(rec["timings"])
    assert rec["versions"]["torch"] == torch.__version__ and rec["versions"]["peft"] == peft.__version__
    assert len(rec["chain"]) == 1 and rec["chain"][0]["ids"] == ["q1", "q2", "q3", "new"]
    # nothing half-written is left beside the output
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_unlearned_adapter_differs_by_delta_and_inputs_are_untouched(text_run):
    old = load_file(text_run["adapter"] / "adapter_model.safetensors")
    new = load_file(text_run["out"] / "adapter_model.safetensors")
    assert old.keys() == new.keys()
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert (sha256_dir(text_run["adapter"]), sha256_file(text_run["data"])) == text_run["before"]
    rec = json.loads((text_run["out"] / "mmerase_record.json").read_text())
    diff = sum(float((new[k].double() - old[k].double()).square().sum()) for k in old) ** 0.5
    assert diff == pytest.approx(rec["result"]["delta_norm"], rel=1e-4)


def test_generate_writes_one_answer_per_record(text_run, tiny_llama_dir, capsys):
    out = text_run["root"] / "answers.jsonl"
    code, stdout, _ = _run(["generate", "--base", tiny_llama_dir, "--adapter", text_run["out"], "--data",
                            text_run["data"], "--out", out, "--batch-size", "5", "--no-progress"], capsys)
    assert code == 0 and "16 answers written" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(16)]
    assert all(isinstance(r["answer"], str) for r in rows)


def test_config_file_values_and_flag_override(text_run, tiny_llama_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {tiny_llama_dir}\nunlearn:\n  solver: cg\n  curvature: ggn\n  damping: 2.0\n"
                   f"  max_steps: 60\n  tol: 1.0e-6\nfinetune:\n  epochs: 1\n")
    out = tmp_path / "u"
    code, stdout, err = _run(["unlearn", "--config", cfg, "--adapter", text_run["adapter"], "--data",
                              text_run["data"], "--edits", text_run["edits"], "--out", out, "--damping", "3.0",
                              "--no-progress"], capsys)
    assert code == 0, err
    rec = json.loads((out / "mmerase_record.json").read_text())
    assert rec["solver"]["damping"] == 3.0 and rec["solver"]["curvature"] == "ggn"  # flag beats config
    assert "unlearned adapter written to" in stdout and "residual" in stdout


def test_default_damping_is_estimated_and_recorded(text_run, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "u"
    code, _, err = _run(["unlearn", "--base", tiny_llama_dir, "--adapter", text_run["adapter"], "--data",
                         text_run["data"], "--edits", text_run["edits"], "--out", out, "--curvature", "ggn",
                         "--damping-scale", "0.05", "--tol", "1e-6", "--max-steps", "100", "--no-progress"], capsys)
    assert code == 0, err
    rec = json.loads((out / "mmerase_record.json").read_text())
    est = rec["damping"]["estimate"]
    assert rec["solver"]["damping"] == "auto" and rec["damping"]["requested"] == "auto"
    assert est["rule"] == "0.05 × top eigenvalue" and est["top_eigenvalue"] > 0 and est["increases"] == []
    assert rec["damping"]["used"] == pytest.approx(0.05 * est["top_eigenvalue"]) == rec["result"]["config"]["damping"]
    assert rec["result"]["converged"] and rec["result"]["residual"] < 1e-6


def test_bad_damping_value(text_run, tiny_llama_dir, tmp_path, capsys):
    msg = _error(["unlearn", "--base", tiny_llama_dir, "--adapter", text_run["adapter"], "--data", text_run["data"],
                  "--edits", text_run["edits"], "--out", tmp_path / "o", "--damping", "big"], capsys)
    assert "--damping" in msg and "'big'" in msg and "auto" in msg


# ----------------------------------------------------------------------------- user errors: one line, exit 2
def _error(args, capsys) -> str:
    code, _, err = _run(args, capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_data_file(text_run, tiny_llama_dir, tmp_path, capsys):
    msg = _error(["unlearn", "--base", tiny_llama_dir, "--adapter", text_run["adapter"], "--data",
                  tmp_path / "nope.jsonl", "--edits", text_run["edits"], "--out", tmp_path / "o"], capsys)
    assert "nope.jsonl" in msg and "not found" in msg


def test_unknown_id_in_edits(text_run, tiny_llama_dir, tmp_path, capsys):
    edits = _write_edits(tmp_path, [{"op": "remove", "id": "q1"}, {"op": "remove", "id": "zzz"}])
    msg = _error(["unlearn", "--base", tiny_llama_dir, "--adapter", text_run["adapter"], "--data", text_run["data"],
                  "--edits", edits, "--out", tmp_path / "o"], capsys)
    assert "line 2" in msg and "no sample with id 'zzz'" in msg
    assert not (tmp_path / "o").exists()


def test_output_that_exists(text_run, tiny_llama_dir, capsys):
    msg = _error(["unlearn", "--base", tiny_llama_dir, "--adapter", text_run["adapter"], "--data", text_run["data"],
                  "--edits", text_run["edits"], "--out", text_run["out"]], capsys)
    assert "already exists" in msg and str(text_run["out"]) in msg


def test_adapter_for_another_base(text_run, tiny_llava_dir, tmp_path, capsys):
    msg = _error(["unlearn", "--base", tiny_llava_dir, "--adapter", text_run["adapter"], "--data", text_run["data"],
                  "--edits", text_run["edits"], "--out", tmp_path / "o"], capsys)
    assert "does not fit" in msg and str(text_run["adapter"]) in msg


def test_unknown_config_key(text_run, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("unlearn:\n  dampin: 0.1\n")
    msg = _error(["unlearn", "--config", cfg], capsys)
    assert "key 'dampin'" in msg and "did you mean 'damping'" in msg and str(cfg) in msg


def test_typo_in_solver_name(capsys):
    msg = _error(["unlearn", "--solver", "cgg"], capsys)
    assert "invalid choice: 'cgg'" in msg


def test_missing_required_option(capsys):
    msg = _error(["unlearn", "--base", "x"], capsys)
    assert "missing --adapter" in msg


def test_failed_write_leaves_nothing_under_the_output_name(text_run, tiny_llama_dir, tmp_path, capsys,
                                                           monkeypatch):
    from mmerase.models.base import ModelBundle

    def broken_save(self, out_dir):
        Path(out_dir, "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelBundle, "save_adapter", broken_save)
    out = tmp_path / "o"
    code, _, err = _run(["unlearn", "--base", tiny_llama_dir, "--adapter", text_run["adapter"], "--data",
                         text_run["data"], "--edits", text_run["edits"], "--out", out, "--curvature", "ggn",
                         "--damping", "1", "--no-progress"], capsys)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_console_script_help_lists_every_command():
    exe = Path(sys.executable).with_name("mmerase")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mmerase"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    for name in ("finetune", "unlearn", "generate", "demo", "eval"):
        assert f"  {name}" in out
    helptext = subprocess.run(cmd + ["unlearn", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--solver", "--curvature", "--damping", "--tol", "--batch-size", "--max-steps", "--seed"):
        assert flag in helptext
    assert "(default: cg)" in helptext


@pytest.mark.parametrize("name", ["demo.yaml", "llava-1.5-7b-a40.yaml"])
def test_shipped_configs_are_valid_for_every_command(name):
    from mmerase.cli import COMMANDS, config_values

    path = Path(__file__).resolve().parents[1] / "configs" / name
    values = {c.name: config_values(str(path), c) for c in COMMANDS}
    if name == "demo.yaml":
        assert values["demo"]["curvature"] == "ggn" and values["demo"]["task"] == ("rc", "qm", "ir")
    else:
        assert values["unlearn"]["quantization"] == "nf4" and values["unlearn"]["solver"] == "cg"
        assert values["finetune"]["lora_r"] == 8 and values["generate"]["max_new_tokens"] == 128


def test_zero3_refuses_mixed_image_and_text_data(tmp_path):
    from mmerase.data import Sample, digit_samples
    from mmerase.influence import Edit
    from mmerase.workflows import check_uniform_modality

    text = Sample("t", [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}])
    images = digit_samples(range(3))
    check_uniform_modality(images, [Edit(old=images[0])], "d.json")  # all images: fine
    with pytest.raises(ValueError, match=r"d.json: under --deepspeed \(ZeRO-3\).*\(3 of 4"):
        check_uniform_modality(images, [Edit(new=text)], "d.json")
