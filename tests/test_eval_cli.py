"""The evaluation CLI: --help documents every option with its default, YAML config with flag overrides and strict
keys, and user errors as one stderr line with exit code 2 (never a traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from fake_openai import FakeOpenAI  # noqa: E402

from mmerase.eval.cli import build_parser, main  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "eval"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["mmvet", "rbench", "rbench-draw", "unlearning"])
def test_help_explains_every_option_with_its_default(command, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    _, subs = build_parser()
    for action in subs[command]._actions:
        for opt in action.option_strings:
            assert opt in text, opt
        if action.dest == "help":
            continue
        assert action.help, action.dest
        if action.default not in (None, False, []):
            assert f"(default: {action.default})" in text, action.dest


def test_prog_name_for_mmerase_eval_dispatch(capsys):
    assert main(["rbench"], prog="mmerase eval") == 2
    assert capsys.readouterr().err.startswith("error: mmerase eval rbench: missing required option(s)")
    assert main(["--help"], prog="mmerase eval") == 0
    assert capsys.readouterr().out.startswith("usage: mmerase eval ")


def test_python_dash_m_mmerase_eval_works():
    r = subprocess.run([sys.executable, "-m", "mmerase.eval", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "mmvet" in r.stdout and "unlearning" in r.stdout


def one_line_error(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def rbench_argv(tmp_path, **over):
    a = {"--questions": str(FIX / "rbench_questions.json"), "--predictions": str(FIX / "rbench_answers.json"),
         "--out": str(tmp_path / "out"), **over}
    return ["rbench", *[x for kv in a.items() for x in kv]]


def test_user_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    one_line_error(capsys, rbench_argv(tmp_path, **{"--questions": str(tmp_path / "nope.json")}), "nope.json",
                   "not found")
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"question_id": 1,\n   "text": "x" "label": "yes"}\n]\n')
    one_line_error(capsys, rbench_argv(tmp_path, **{"--questions": str(bad)}), "bad.json:3:", "invalid JSON")
    badl = tmp_path / "answers.jsonl"
    badl.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 2, "text": }\n')
    one_line_error(capsys, rbench_argv(tmp_path, **{"--predictions": str(badl)}), "answers.jsonl:2:")
    one_line_error(capsys, rbench_argv(tmp_path, **{"--mode": "lenient"}), "invalid choice: 'lenient'")
    one_line_error(capsys, rbench_argv(tmp_path) + ["--frobnicate"], "unrecognized arguments: --frobnicate")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(capsys, rbench_argv(tmp_path, **{"--out": str(afile)}), "not a folder")
    one_line_error(capsys, rbench_argv(tmp_path, **{"--out": str(afile / "sub")}), "cannot create output folder")
    one_line_error(capsys, ["rbench", "--questions", "q.json"], "missing required option(s) --predictions, --out")
    one_line_error(capsys, rbench_argv(tmp_path, **{"--decimal-places": "-1"}), "--decimal-places")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"question_id": 1, "text": "?", "label": "maybe"}]))
    one_line_error(capsys, rbench_argv(tmp_path, **{"--questions": str(labels)}), "label must be 'yes' or 'no'")


def mmvet_argv(tmp_path, url="http://127.0.0.1:9/v1", preds=FIX / "mmvet_small_predictions.json"):
    return ["mmvet", "--metadata", str(FIX / "mmvet_small.json"), "--predictions", str(preds), "--judge-model",
            "judge-x-0613", "--base-url", url, "--out", str(tmp_path / "out")]


def test_mmvet_user_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    one_line_error(capsys, mmvet_argv(tmp_path) + ["--api-key-env", "MY_JUDGE_KEY"], "MY_JUDGE_KEY is not set")
    monkeypatch.setenv("OPENAI_API_KEY", "k-123456")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"v1_0": "a", "v1_1": "b"}))
    one_line_error(capsys, mmvet_argv(tmp_path, preds=partial), "no prediction for 4 of 6", "--subset")
    one_line_error(capsys, mmvet_argv(tmp_path) + ["--max-cost", "5"], "--max-cost needs a price")
    one_line_error(capsys, mmvet_argv(tmp_path) + ["--runs", "0"], "--runs must be at least 1")
    one_line_error(capsys, mmvet_argv(tmp_path) + ["--runs", "two"], "invalid int value: 'two'")
    one_line_error(capsys, mmvet_argv(tmp_path) + ["--max-cost", "-1"], "--max-cost")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_config_flags_override_and_unknown_keys_fail(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    with FakeOpenAI() as srv:
        monkeypatch.setenv("OPENAI_API_KEY", srv.key)
        cfg = write(tmp_path / "run.yaml", f"""
metadata: {FIX / 'mmvet_small.json'}
predictions: {FIX / 'mmvet_small_predictions.json'}
judge-model: judge-x-0613
base_url: {srv.url}
runs: 2
concurrency: 1
progress: off
out: {out}
""")
        assert main(["mmvet", "--config", str(cfg)]) == 0
        s = json.loads((out / "mmvet_summary.json").read_text())
        assert s["num_runs"] == 2 and s["scores"]["total"] == pytest.approx(50.0)
        old_url = srv.url
    with FakeOpenAI() as srv:  # a fresh server: its scripted per-run scores start over
        cfg.write_text(cfg.read_text().replace(old_url, srv.url))
        assert main(["mmvet", "--config", str(cfg), "--runs", "1", "--out", str(tmp_path / "one")]) == 0
        s = json.loads((tmp_path / "one" / "mmvet_summary.json").read_text())
        assert s["num_runs"] == 1 and s["scores"]["total"] == pytest.approx(320 / 6)
    capsys.readouterr()
    one_line_error(capsys, ["mmvet", "--config", str(write(tmp_path / "u.yaml", "judge_modle: x\n"))],
                   "unknown key 'judge_modle'", "judge-model")
    one_line_error(capsys, ["mmvet", "--config", str(write(tmp_path / "v.yaml", "runs: many\n"))],
                   "'runs' has an invalid value")
    one_line_error(capsys, ["mmvet", "--config", str(write(tmp_path / "w.yaml", "concurrency: 1.5\n"))],
                   "'concurrency' has an invalid value")
    one_line_error(capsys, ["mmvet", "--config", str(write(tmp_path / "c.yaml", "mmvet-version: v3\n"))],
                   "must be one of auto, v1, v2")
    one_line_error(capsys, ["mmvet", "--config", str(write(tmp_path / "y.yaml", "runs: [1\nout: x\n"))],
                   "y.yaml:", "invalid YAML")
    one_line_error(capsys, ["rbench", "--config", str(write(tmp_path / "l.yaml", "- a\n- b\n"))], "mapping")
    err = one_line_error(capsys, ["rbench", "--config", str(write(tmp_path / "a.yaml", "azure: true\n"))])
    assert re.search(r"unknown key 'azure' for 'rbench'", err)


def test_yaml_config_lists_and_mappings(tmp_path, capsys):
    recs = []
    for name in ("a", "b"):
        p = write(tmp_path / f"{name}.jsonl", json.dumps({"id": 1, "split": "forget", "loss": 1.0}) + "\n")
        recs.append((name, p))
    cfg = write(tmp_path / "u.yaml", "records:\n" + "".join(f"  {n}: {p}\n" for n, p in recs)
                + f"out: {tmp_path / 'out'}\n")
    assert main(["unlearning", "--config", str(cfg)]) == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "out" / "unlearning_summary.json").read_text())
    assert list(s["adapters"]) == ["a", "b"]
    cfg = write(tmp_path / "r.yaml", f"questions: {FIX / 'rbench_questions.json'}\npredictions: "
                f"{FIX / 'rbench_answers.json'}\nsubset-ids:\n  - {FIX / 'rbench_ids_1.json'}\n  - "
                f"{FIX / 'rbench_ids_2.json'}\nmode: strict\nout: {tmp_path / 'rb'}\n")
    assert main(["rbench", "--config", str(cfg)]) == 0
    s = json.loads((tmp_path / "rb" / "rbench_summary.json").read_text())
    assert s["mode"] == "strict" and list(s["subsets"]) == ["rbench_ids_1", "rbench_ids_2"]
