"""Broken and hostile adapters and preparations against the `mmerase` command line (issue 27).

One tiny adapter and one preparation are made once; each case breaks a copy (a truncated or empty safetensors file,
a pickle-only ``adapter_model.bin``, another peft type, NaN weights, an adapter config that is not JSON / not UTF-8
/ nested too deeply / a folder, a tampered preparation record) and drives the real CLI with it. Each refusal is
checked for what the README promises: exit code 2, one line on stderr (no traceback, never "internal error", never
a suggestion to load with ``weights_only=False``) that names the file, folder or weight and is at most 1 kB; every
input's bytes unchanged (sha256 before and after); no output and no partial output left behind.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmerase.cli import main
from mmerase.record import sha256_dir, sha256_file

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SOLVE = ["--curvature", "ggn", "--damping", "1", "--max-steps", "5", "--no-progress"]
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
RECORD, TENSORS = "preparation.json", "preconditioner.safetensors"

UNPICKLED: list[str] = []  # what a pickle-only adapter would have run, had it been unpickled


def _ran_on_load() -> str:
    UNPICKLED.append("ran")
    return "ran"


class Arbitrary:
    """An object whose unpickling runs code (here: a harmless marker)."""

    def __reduce__(self):
        return _ran_on_load, ()


# ----------------------------------------------------------------------------------------------------------- helpers
def digest(path: Path) -> tuple:
    if path.is_dir():
        return sha256_dir(path), sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    return (sha256_file(path),)


def refused(args: list, capsys, *names: object, inputs: tuple = (), out: Path | None = None) -> str:
    """Run the CLI, expect a refusal (exit 2, one line naming ``names``), unchanged inputs and nothing at ``out``."""
    before = {p: digest(Path(p)) for p in inputs}
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert len(err.encode("utf-8")) <= 1000, err
    assert "weights_only=False" not in err and "internal error" not in err and "Traceback" not in err, err
    assert "\x1b" not in err, err
    for name in names:
        assert str(name) in err, (name, err)
    for p, d in before.items():
        assert digest(Path(p)) == d, f"{p} changed"
    if out is not None:
        assert not out.exists()
        assert [q for q in out.parent.iterdir() if ".partial-" in q.name] == []
    return err


@pytest.fixture(scope="module")
def made(tiny_llama_dir, tmp_path_factory):
    """One tiny adapter, its data and edits, and a preparation for it; cases break copies of them."""
    root = tmp_path_factory.mktemp("hostile-models")
    rows = [{"id": f"q{i}", "conversations": [{"from": "human", "value": f"Spell {i}"},
                                               {"from": "gpt", "value": WORDS[i % 10]}]} for i in range(8)]
    data, edits = root / "train.jsonl", root / "edits.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edits.write_text(json.dumps({"op": "remove", "id": "q1"}) + "\n")
    adapter, prep = root / "adapter", root / "prep"
    assert main(["finetune", "--base", tiny_llama_dir, "--data", str(data), "--out", str(adapter), "--epochs", "1",
                 "--lora-r", "4", "--batch-size", "4", "--no-progress"]) == 0
    assert main(["prepare", "--base", tiny_llama_dir, "--adapter", str(adapter), "--data", str(data), "--out",
                 str(prep), "--kind", "lowrank", "--rank", "4", *SOLVE[:4], "--no-progress"]) == 0
    return {"base": Path(tiny_llama_dir), "data": data, "edits": edits, "adapter": adapter, "prep": prep}


def command(which: str, made: dict, adapter: Path, out_dir: Path, prep: Path | None = None) -> tuple[list, Path]:
    """``unlearn`` (optionally ``--prepared``) or ``generate`` with ``adapter``; returns (args, the --out path)."""
    if which == "generate":
        out = out_dir / "answers.jsonl"
        return ["generate", "--base", made["base"], "--adapter", adapter, "--data", made["data"], "--out", out], out
    out = out_dir / "unlearned"
    args = ["unlearn", "--base", made["base"], "--adapter", adapter, "--data", made["data"], "--edits",
            made["edits"], "--out", out, *SOLVE]
    return args + (["--prepared", prep] if prep is not None else []), out


def inputs_of(made: dict, *extra: Path) -> tuple:
    return (made["base"], made["data"], made["edits"], *extra)


# -------------------------------------------------------------------------------------------------- broken adapters
def _empty_weights(a: Path) -> tuple:
    (a / WEIGHTS).write_bytes(b"")
    return a / WEIGHTS, "is not a readable safetensors file ("


def _truncated_weights(a: Path) -> tuple:
    raw = (a / WEIGHTS).read_bytes()
    (a / WEIGHTS).write_bytes(raw[: len(raw) // 2])
    return a / WEIGHTS, "is not a readable safetensors file ("


def _cut_header(a: Path) -> tuple:
    (a / WEIGHTS).write_bytes((a / WEIGHTS).read_bytes()[:20])
    return a / WEIGHTS, "is not a readable safetensors file ("


def _pickled_object(a: Path) -> tuple:
    (a / WEIGHTS).unlink()
    (a / "adapter_model.bin").write_bytes(pickle.dumps({"weight": Arbitrary()}))
    return a / "adapter_model.bin", "mmerase only loads adapter weights"


def _torch_saved_object(a: Path) -> tuple:
    (a / WEIGHTS).unlink()
    torch.save({"weight": Arbitrary()}, a / "adapter_model.bin")
    return a / "adapter_model.bin", "mmerase only loads adapter weights"


def _truncated_bin(a: Path) -> tuple:
    state = load_file(a / WEIGHTS)
    (a / WEIGHTS).unlink()
    torch.save(state, a / "adapter_model.bin")
    raw = (a / "adapter_model.bin").read_bytes()
    (a / "adapter_model.bin").write_bytes(raw[: len(raw) // 2])
    return a / "adapter_model.bin", "is not a readable torch weights file"


def _prefix_tuning(a: Path) -> tuple:
    (a / CONFIG).write_text(json.dumps({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                                        "num_virtual_tokens": 4, "base_model_name_or_path": "x"}))
    return a, "'PREFIX_TUNING' adapter", "mmerase unlearns LoRA adapters"


def _hostile_peft_type(a: Path) -> tuple:
    config = json.loads((a / CONFIG).read_text())
    (a / CONFIG).write_text(json.dumps({**config, "peft_type": "\x1b[31mEVIL" + "X" * 5000}))
    return a, "'\\x1b[31mEVILXX", "more characters", "mmerase unlearns LoRA adapters"


def _nan_weight(a: Path) -> tuple:
    state = load_file(a / WEIGHTS)
    name = sorted(state)[3]
    state[name].view(-1)[:2] = float("nan")
    state[name].view(-1)[2] = float("inf")
    save_file(state, a / WEIGHTS)
    return a, "holds non-finite weights", f"1 of {len(state)} weight(s)", f"'{name}' (3 value(s))"


def _config_not_json(a: Path) -> tuple:
    (a / CONFIG).write_text('{"peft_type": "LORA", r: 4}')
    return a / CONFIG, "invalid JSON"


def _config_not_utf8(a: Path) -> tuple:
    (a / CONFIG).write_bytes(b'{"peft_type": "\xff\xfe"}')
    return a / CONFIG, "not UTF-8"


def _config_nested(a: Path) -> tuple:
    (a / CONFIG).write_text('{"peft_type": "LORA", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    return a / CONFIG, "nested deeper than"


def _config_twice(a: Path) -> tuple:
    config = json.loads((a / CONFIG).read_text())
    (a / CONFIG).write_text(json.dumps(config)[:-1] + ', "peft_type": "LORA"}')
    return a / CONFIG, "'peft_type' is given twice"


def _config_folder(a: Path) -> tuple:
    (a / CONFIG).unlink()
    (a / CONFIG).mkdir()
    (a / CONFIG / "x").write_text("{}")
    return a / CONFIG, "is a folder"


def _config_list(a: Path) -> tuple:
    (a / CONFIG).write_text("[1, 2]")
    return a / CONFIG, "expected a JSON object"


def _config_bad_value(a: Path) -> tuple:
    config = json.loads((a / CONFIG).read_text())
    (a / CONFIG).write_text(json.dumps({**config, "target_modules": 5}))
    return a / CONFIG, "does not describe an adapter peft can build"


ADAPTER_CASES = {f.__name__.strip("_"): f for f in (
    _empty_weights, _truncated_weights, _cut_header, _pickled_object, _torch_saved_object, _truncated_bin,
    _prefix_tuning, _hostile_peft_type, _nan_weight, _config_not_json, _config_not_utf8, _config_nested,
    _config_twice, _config_folder, _config_list, _config_bad_value)}


@pytest.mark.parametrize("which", ["unlearn", "generate"])
@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_a_broken_adapter_is_one_clear_line(made, tmp_path, capsys, case, which):
    adapter = tmp_path / "adapter"
    shutil.copytree(made["adapter"], adapter)
    names = ADAPTER_CASES[case](adapter)
    args, out = command(which, made, adapter, tmp_path)
    UNPICKLED.clear()
    err = refused(args, capsys, *names, inputs=inputs_of(made, adapter), out=out)
    assert err.startswith(f"mmerase {which}: error: ")
    assert UNPICKLED == [], "a pickled object was unpickled"


def test_a_weights_only_bin_adapter_still_loads(made, tmp_path, capsys):
    """The refusals above leave a legacy adapter of plain tensors (what old peft wrote) loadable."""
    adapter = tmp_path / "adapter"
    shutil.copytree(made["adapter"], adapter)
    torch.save(load_file(adapter / WEIGHTS), adapter / "adapter_model.bin")
    (adapter / WEIGHTS).unlink()
    args, out = command("generate", made, adapter, tmp_path)
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 8


# ---------------------------------------------------------------------------------------------- broken preparations
def _edit_record(p: Path, change) -> None:
    record = json.loads((p / RECORD).read_text())
    change(record)
    (p / RECORD).write_text(json.dumps(record))


def _empty_tensors(p: Path) -> tuple:
    (p / TENSORS).write_bytes(b"")
    return p / TENSORS, "is not a readable safetensors file ("


def _truncated_tensors(p: Path) -> tuple:
    raw = (p / TENSORS).read_bytes()
    (p / TENSORS).write_bytes(raw[: len(raw) // 2])
    return p / TENSORS, "is not a readable safetensors file ("


def _nan_tensors(p: Path) -> tuple:
    tensors = load_file(p / TENSORS)
    tensors["values"][0] = float("nan")
    save_file(tensors, p / TENSORS)
    return p / TENSORS, "hold NaN or inf", "'values'"


def _garbled_record(p: Path) -> tuple:
    (p / RECORD).write_text((p / RECORD).read_text()[:40])
    return p / RECORD, "invalid JSON"


def _record_not_utf8(p: Path) -> tuple:
    (p / RECORD).write_bytes(b'{"format": 1, "kind": "\xff"}')
    return p / RECORD, "not UTF-8"


def _nested_record(p: Path) -> tuple:
    (p / RECORD).write_text('{"format": 1, "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    return p / RECORD, "nested deeper than"


def _record_key_twice(p: Path) -> tuple:
    (p / RECORD).write_text((p / RECORD).read_text().rstrip()[:-1] + ', "kind": "lowrank"}')
    return p / RECORD, "'kind' is given twice"


def _unknown_kind(p: Path) -> tuple:
    _edit_record(p, lambda r: r.update(kind="\x1b[2Jevil"))
    return p / RECORD, "unknown preconditioner kind '\\x1b[2Jevil'"


def _kinds_disagree(p: Path) -> tuple:
    _edit_record(p, lambda r: r.update(kind="ekfac"))
    return p / RECORD, "kind 'ekfac'", "'lowrank' disagree"


def _info_kind_unknown(p: Path) -> tuple:
    _edit_record(p, lambda r: r["preconditioner"].update(kind="evil"))
    return p / RECORD, "'evil' disagree"


def _info_tampered(p: Path) -> tuple:
    _edit_record(p, lambda r: r["preconditioner"]["shapes"].__setitem__(0, [3, 3]))
    return p / TENSORS, "do not form a lowrank preconditioner"


def _no_adapter_hash(p: Path) -> tuple:
    _edit_record(p, lambda r: r["adapter"].pop("sha256"))
    return p, "lacks the adapter sha256", "prepare again"


def _null_data_hash(p: Path) -> tuple:
    _edit_record(p, lambda r: r["data"].update(sha256=None))
    return p, "lacks the data sha256", "prepare again"


def _damping_not_a_number(p: Path) -> tuple:
    _edit_record(p, lambda r: r.update(damping="1; rm -rf /"))
    return p / RECORD, "'damping' must be a finite number", "'1; rm -rf /'"


def _other_format(p: Path) -> tuple:
    _edit_record(p, lambda r: r.update(format=[2]))
    return p / RECORD, "preparation format [2]"


PREP_CASES = {f.__name__.strip("_"): f for f in (
    _empty_tensors, _truncated_tensors, _nan_tensors, _garbled_record, _record_not_utf8, _nested_record,
    _record_key_twice, _unknown_kind, _kinds_disagree, _info_kind_unknown, _info_tampered, _no_adapter_hash,
    _null_data_hash, _damping_not_a_number, _other_format)}


@pytest.mark.parametrize("case", sorted(PREP_CASES))
def test_a_broken_preparation_is_one_clear_line(made, tmp_path, capsys, case):
    prep = tmp_path / "prep"
    shutil.copytree(made["prep"], prep)
    names = PREP_CASES[case](prep)
    args, out = command("unlearn", made, made["adapter"], tmp_path, prep=prep)
    err = refused(args, capsys, *names, inputs=inputs_of(made, made["adapter"], prep), out=out)
    assert err.startswith("mmerase unlearn: error: ")


def test_the_intact_preparation_is_accepted(made, tmp_path, capsys):
    """The copies above differ from a preparation that works only in what each case broke."""
    prep = tmp_path / "prep"
    shutil.copytree(made["prep"], prep)
    args, out = command("unlearn", made, made["adapter"], tmp_path, prep=prep)
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    record = json.loads((out / "mmerase_record.json").read_text())
    assert record["prepared"]["kind"] == "lowrank"
