"""Careless and hostile input against the `mmerase` command line (issue 27): every case builds its own files here.

Each refusal is checked for what the README promises: exit code 2, one line on stderr that names the file, line,
id or option and is at most 1 kB, the inputs' bytes unchanged (sha256 before and after) and no output or partial
output left behind. Cases that must succeed (a flag that allows what is refused by default) are checked for what
they wrote.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmerase.cli import main
from mmerase.record import sha256_dir, sha256_file

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ----------------------------------------------------------------------------------------------------------- helpers
def digest(path: Path) -> str:
    return sha256_dir(path) if path.is_dir() else sha256_file(path)


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial-" in p.name]


def refused(args: list, capsys, *names: object, inputs: tuple = (), out: Path | None = None) -> str:
    """Run the CLI, assert a one-line user error (exit 2) naming ``names``, inputs unchanged, nothing written."""
    before = {Path(p): digest(Path(p)) for p in inputs}
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert len(err.encode()) <= 1000, len(err.encode())
    assert "internal error" not in err and "Traceback" not in err and "\x1b" not in err, err
    for name in names:
        assert str(name) in err, (name, err)
    for p, h in before.items():
        assert digest(p) == h, f"{p} changed"
    if out is not None:
        assert not os.path.lexists(out) or out.is_symlink(), f"{out} was written"
        assert partials(Path(out).parent) == []
    return err


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows(n: int = 12) -> list[dict]:
    return [{"id": f"q{i}", "conversations": [{"from": "human", "value": f"Spell {i}"},
                                               {"from": "gpt", "value": WORDS[i % 10]}]} for i in range(n)]


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    """One tiny adapter and its data, made once; tests copy what they must break."""
    root = tmp_path_factory.mktemp("hostile")
    data = write_jsonl(root / "data" / "train.jsonl", text_rows())
    adapter = root / "adapter"
    assert main(["finetune", "--base", tiny_llama_dir, "--data", data, "--out", adapter, "--epochs", "1",
                 "--lora-r", "4", "--batch-size", "4", "--no-progress"]) == 0
    return {"root": root, "data": data, "adapter": adapter, "base": tiny_llama_dir}


def unlearn_args(t: dict, edits: Path, out: Path, *extra: object) -> list:
    return ["unlearn", "--base", t["base"], "--adapter", t["adapter"], "--data", t["data"], "--edits", edits,
            "--out", out, "--curvature", "ggn", "--damping", "1.0", "--max-steps", "5", "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------- config and echoes
ALIAS_BOMB = "\n".join(
    [f"a: &a [{','.join(['lol'] * 9)}]"]
    + [f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    + ["lr: *i"]) + "\n"


def test_yaml_alias_bomb_is_refused_fast_and_small(tmp_path, capsys):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 400  # 9^9 ≈ 387 million strings once expanded
    assert main(["finetune", "--help"]) == 0  # the imports a first command pays are not the refusal's cost
    capsys.readouterr()
    tracemalloc.start()
    t0 = time.perf_counter()
    err = refused(["finetune", "--config", cfg, "--base", "tiny-llama", "--data", "x", "--out", tmp_path / "o"],
                  capsys, cfg, inputs=(cfg,), out=tmp_path / "o")
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "aliases" in err
    assert elapsed < 2.0 and peak < 50 * 2**20, (elapsed, peak)


def test_duplicate_keys_in_a_config_are_refused_with_their_line(tmp_path, capsys):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("finetune:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n")
    err = refused(["finetune", "--config", cfg, "--base", "tiny-llama", "--data", "x", "--out", tmp_path / "o"],
                  capsys, f"{cfg}:4", "'epochs'", inputs=(cfg,))
    assert "twice" in err


def test_a_huge_hostile_id_is_echoed_bounded_and_escaped(trained, tmp_path, capsys):
    sid = "\x1b[31mred\nforged line" + "x" * 10_000_000
    edits = write_jsonl(tmp_path / "e.jsonl", [{"op": "remove", "id": sid}])
    err = refused(unlearn_args(trained, edits, tmp_path / "o"), capsys, f"{edits}: line 1", "\\x1b[31mred\\nforged",
                  "more characters", inputs=(edits, trained["adapter"], trained["data"]), out=tmp_path / "o")
    assert "forged line" not in err.replace("\\nforged line", "")


def test_duplicate_keys_in_an_edits_line_are_refused(trained, tmp_path, capsys):
    edits = tmp_path / "e.jsonl"
    edits.write_text('{"op": "correct", "id": "q1", "response": "one", "response": "uno"}\n')
    refused(unlearn_args(trained, edits, tmp_path / "o"), capsys, f"{edits}: line 1", "'response'", "twice",
            inputs=(edits,), out=tmp_path / "o")


def test_deeply_nested_and_non_utf8_edits_files_are_user_errors(trained, tmp_path, capsys):
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"op": "remove", "id": "q1", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    refused(unlearn_args(trained, nested, tmp_path / "o"), capsys, f"{nested}: line 1", "nested",
            inputs=(nested,), out=tmp_path / "o")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"op": "correct", "id": "q1", "response": "caf\xe9"}\n'.encode("latin-1"))
    refused(unlearn_args(trained, latin, tmp_path / "o"), capsys, latin, "UTF-8", inputs=(latin,), out=tmp_path / "o")
    folder = tmp_path / "edits-folder"
    folder.mkdir()
    refused(unlearn_args(trained, folder, tmp_path / "o"), capsys, folder, "folder", out=tmp_path / "o")


def test_deeply_nested_dataset_and_duplicate_record_keys_are_refused(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text("[" * 50_000 + "]" * 50_000)
    refused(["finetune", "--base", tiny_llama_dir, "--data", data, "--out", tmp_path / "o"], capsys, data, "nested",
            inputs=(data,), out=tmp_path / "o")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "id": "b", "conversations": []}\n')
    refused(["finetune", "--base", tiny_llama_dir, "--data", dup, "--out", tmp_path / "o"], capsys, f"{dup}: line 1",
            "'id'", inputs=(dup,), out=tmp_path / "o")


def test_an_assistant_only_sample_is_a_data_error(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", text_rows(3) + [
        {"id": "lonely", "conversations": [{"from": "gpt", "value": "an answer to nothing"}]}])
    refused(["finetune", "--base", tiny_llama_dir, "--data", data, "--out", tmp_path / "o", "--no-progress"], capsys,
            f"{data}: line 4", "'lonely'", "user", inputs=(data,), out=tmp_path / "o")


# ------------------------------------------------------------------------------------------ options at parse time
@pytest.mark.parametrize("flags, named", [
    (["--epochs", "0"], "epochs"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--batch-size", "0"], "batch_size"), (["--batch-size", "-1"], "batch_size"),
    (["--lora-alpha", "inf"], "--lora-alpha")])
def test_finetune_numbers_are_checked_before_any_work(tmp_path, capsys, flags, named):
    refused(["finetune", "--base", "no-such-base", "--data", "no-such-data", "--out", tmp_path / "o", *flags], capsys,
            named, out=tmp_path / "o")


@pytest.mark.parametrize("flags, named", [
    (["--damping", "inf"], "--damping"), (["--damping-scale", "inf"], "--damping-scale"),
    (["--damping-scale", "nan"], "--damping-scale"), (["--tol", "-1"], "--tol")])
def test_solver_numbers_are_checked_before_any_work(tmp_path, capsys, flags, named):
    refused(["unlearn", "--base", "b", "--adapter", "a", "--data", "d", "--edits", "e", "--out", tmp_path / "o",
             *flags], capsys, named, out=tmp_path / "o")


@pytest.mark.parametrize("flags, named", [(["--batch-size", "-1"], "batch_size"), (["--batch-size", "0"], "batch_size"),
                                          (["--max-new-tokens", "0"], "max_new_tokens")])
def test_generate_refuses_sizes_that_would_answer_nothing(trained, tmp_path, capsys, flags, named):
    refused(["generate", "--base", trained["base"], "--data", trained["data"], "--out", tmp_path / "a.jsonl", *flags],
            capsys, named, inputs=(trained["data"],), out=tmp_path / "a.jsonl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a device that is absent")
def test_cuda_without_cuda_is_refused_at_parse_time(tmp_path, capsys):
    refused(["finetune", "--base", "b", "--data", "d", "--out", tmp_path / "o", "--device", "cuda"], capsys,
            "--device", "CUDA", out=tmp_path / "o")


# -------------------------------------------------------------------------------- silent wrong results, now refused
def test_out_inside_the_input_adapter_is_refused(trained, tmp_path, capsys):
    edits = write_jsonl(tmp_path / "e.jsonl", [{"op": "remove", "id": "q1"}])
    inside = trained["adapter"] / "again"
    refused(unlearn_args(trained, edits, inside), capsys, inside, "inside the input", inputs=(trained["adapter"],),
            out=inside)
    answers = trained["adapter"] / "answers.jsonl"
    refused(["generate", "--base", trained["base"], "--adapter", trained["adapter"], "--data", trained["data"],
             "--out", answers], capsys, answers, inputs=(trained["adapter"],), out=answers)


def test_data_that_is_not_the_adapters_is_refused_unless_allowed(trained, tmp_path, capsys):
    other = write_jsonl(tmp_path / "other" / "train.jsonl", text_rows(13))
    edits = write_jsonl(tmp_path / "other" / "e.jsonl", [{"op": "remove", "id": "q1"}])
    args = unlearn_args(trained, edits, tmp_path / "o")
    args[args.index("--data") + 1] = other
    err = refused(args, capsys, other, sha256_file(other)[:12], sha256_file(trained["data"])[:12],
                  "--allow-other-data", inputs=(other, trained["adapter"]), out=tmp_path / "o")
    assert "13 samples" in err and "12 samples" in err
    assert main([str(a) for a in args + ["--allow-other-data", "--estimate"]]) == 0


def test_removing_every_training_sample_is_refused(trained, tmp_path, capsys):
    edits = write_jsonl(tmp_path / "e.jsonl", [{"op": "remove", "id": r["id"]} for r in text_rows()])
    refused(unlearn_args(trained, edits, tmp_path / "o"), capsys, edits, "all 12", inputs=(edits,),
            out=tmp_path / "o")


def test_an_edit_longer_than_the_context_is_warned_about(trained, tmp_path, capsys):
    edits = write_jsonl(tmp_path / "e.jsonl", [{"op": "correct", "id": "q2", "response": "two " * 200}])
    out = tmp_path / "o"
    assert main([str(a) for a in unlearn_args(trained, edits, out)]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "line 1" in warning[0] and "'q2'" in warning[0] and "(512)" in warning[0], err
    assert json.loads((out / "mmerase_record.json").read_text())["warnings"] == [warning[0].split("warning: ", 1)[1]]


# --------------------------------------------------------------------------------------------------- edit images
@pytest.fixture()
def image_data(tiny_llava_dir, tmp_path):
    """A two-sample image dataset for tiny-llava, one outside image and a symlink inside pointing out."""
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / "img" / f"{i}.png")
    rows = [{"id": f"i{i}", "image": f"img/{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": WORDS[i]}]} for i in range(2)]
    data = write_jsonl(root / "train.jsonl", rows)
    outside = tmp_path / "elsewhere" / "x.png"
    outside.parent.mkdir()
    Image.new("RGB", (16, 16), (0, 200, 0)).save(outside)
    (root / "img" / "link.png").symlink_to(outside)
    return {"data": data, "root": root, "outside": outside, "base": tiny_llava_dir}


@pytest.mark.parametrize("given", ["../elsewhere/x.png", "ABSOLUTE", "img/link.png"])
def test_edit_images_outside_the_data_folders_are_refused(image_data, tmp_path, capsys, given):
    given = str(image_data["outside"]) if given == "ABSOLUTE" else given
    edits = write_jsonl(image_data["root"] / "e.jsonl", [{"op": "modify", "id": "i1", "image": given}])
    refused(["unlearn", "--base", image_data["base"], "--adapter", tmp_path / "no-adapter", "--data",
             image_data["data"], "--edits", edits, "--out", tmp_path / "o"], capsys, f"{edits}: line 1",
            str(image_data["outside"]), "--allow-outside-images", inputs=(edits, image_data["outside"]),
            out=tmp_path / "o")


def test_allowed_outside_images_and_inside_ones_are_recorded_with_their_hash(image_data, tmp_path, capsys):
    base, data = image_data["base"], image_data["data"]
    adapter = tmp_path / "adapter"
    assert main(["finetune", "--base", str(base), "--data", str(data), "--out", str(adapter), "--epochs", "1",
                 "--lora-r", "2", "--no-progress"]) == 0
    edits = write_jsonl(image_data["root"] / "e.jsonl", [
        {"op": "modify", "id": "i0", "image": "img/2.png"},
        {"op": "modify", "id": "i1", "image": "../elsewhere/x.png"}])
    out = tmp_path / "o"
    assert main(["unlearn", "--base", str(base), "--adapter", str(adapter), "--data", str(data), "--edits",
                 str(edits), "--out", str(out), "--curvature", "ggn", "--damping", "1.0", "--max-steps", "3",
                 "--allow-outside-images", "--no-progress"]) == 0, capsys.readouterr().err
    images = json.loads((out / "mmerase_record.json").read_text())["chain"][-1]["images"]
    root = image_data["root"]
    assert images == [
        {"line": 1, "given": "img/2.png", "path": str(root / "img/2.png"),
         "resolved": str((root / "img/2.png").resolve()), "sha256": sha256_file(root / "img/2.png")},
        {"line": 2, "given": "../elsewhere/x.png", "path": str(root / "../elsewhere/x.png"),
         "resolved": str(image_data["outside"].resolve()), "sha256": sha256_file(image_data["outside"])}]


# ------------------------------------------------------------------------------- outputs: checked before any work
def test_unusable_outputs_are_refused_before_anything_is_loaded(tmp_path, capsys):
    """The base named here does not exist: a refusal about the output proves the output was checked first."""
    data = write_jsonl(tmp_path / "d.jsonl", text_rows(2))
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [(tmp_path / "dangling", "already exists"), (tmp_path / "a-file" / "o", "not a folder"),
             (tmp_path / ("n" * 250), "too long")]
    for out, why in cases:
        refused(["finetune", "--base", tmp_path / "no-base", "--data", data, "--out", out], capsys, why,
                inputs=(data, tmp_path / "a-file"))
        assert partials(tmp_path) == []
    assert (tmp_path / "dangling").is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_second_writer_of_the_same_out_is_refused_at_once(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", text_rows(2))
    busy = tmp_path / ".o.partial-livewriter"  # what a live writer holds: its partial folder, locked
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        refused(["finetune", "--base", tmp_path / "no-base", "--data", data, "--out", tmp_path / "o"], capsys,
                tmp_path / "o", "another mmerase process", inputs=(data,))
        assert [p.name for p in partials(tmp_path)] == [busy.name]
    finally:
        os.close(fd)


def test_a_killed_runs_partial_output_is_cleaned_by_the_next_writer(tmp_path, capsys, tiny_llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", text_rows(4))
    stale = tmp_path / ".o.partial-killedrun"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    assert main(["finetune", "--base", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--lora-r", "2", "--no-progress"]) == 0
    assert partials(tmp_path) == [] and (tmp_path / "o" / "adapter_model.safetensors").is_file()
    assert oct((tmp_path / "o").stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert oct((tmp_path / "o" / "adapter_model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_sigterm_during_finetune_leaves_no_partial_output(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", text_rows(12))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "mmerase.cli", "finetune", "--base", str(tiny_llama_dir), "--data", str(data),
           "--out", str(out), "--epochs", "10000", "--no-progress"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not partials(tmp_path) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert partials(tmp_path), "the run never reserved its output"
        time.sleep(2.0)  # inside the training loop by now
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "mmerase: terminated (SIGTERM); no output was written"
    assert not out.exists() and partials(tmp_path) == []


def test_a_failed_final_rename_removes_the_partial_output(tmp_path):
    from mmerase.fileio import OutputExistsError, atomic_output_dir

    out = tmp_path / "o"
    with pytest.raises(OutputExistsError, match="appeared while"):
        with atomic_output_dir(out) as tmp:
            (tmp / "x").write_text("work")
            out.symlink_to(tmp_path / "nowhere")  # someone else took the name meanwhile
    assert partials(tmp_path) == [] and out.is_symlink()


def test_an_unwritable_parent_is_refused_before_any_work(tmp_path, capsys):
    """The base and data named do not exist, so the refusal proves the output is checked first. As root every
    folder is writable by permission, so there the parent is /proc, where nothing can be created."""
    if os.geteuid() == 0:
        parent = Path("/proc")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        os.chmod(parent, 0o555)
    out = parent / "mmerase-out"
    refused(["finetune", "--base", "no-base", "--data", "no-data", "--out", out], capsys, out, out=out)
    assert not os.path.lexists(out)


def test_prepare_refuses_data_that_is_not_the_adapters(trained, tmp_path, capsys):
    other = write_jsonl(tmp_path / "train.jsonl", text_rows(12)[::-1])  # the same samples, another order
    out = tmp_path / "prep"
    refused(["prepare", "--base", trained["base"], "--adapter", trained["adapter"], "--data", other, "--out", out,
             "--curvature", "ggn", "--damping", "1", "--no-progress"], capsys, other, "--allow-other-data",
            inputs=(other, trained["adapter"]), out=out)


@pytest.mark.parametrize("text, why", [("[" * 100_000 + "]" * 100_000, "nested"),
                                       ('{"data": {}, "data": {}}', "twice")])
def test_a_broken_run_record_beside_the_adapter_is_a_user_error(trained, tmp_path, capsys, text, why):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], adapter)
    (adapter / "mmerase_record.json").write_text(text)
    edits = write_jsonl(tmp_path / "e.jsonl", [{"op": "remove", "id": "q1"}])
    args = unlearn_args(trained, edits, tmp_path / "o")
    args[args.index("--adapter") + 1] = adapter
    refused(args, capsys, adapter / "mmerase_record.json", why, inputs=(adapter,), out=tmp_path / "o")


def test_relative_outputs_do_not_take_their_own_partial_for_another_writer(tmp_path, monkeypatch):
    from mmerase.fileio import atomic_output_dir, write_json

    monkeypatch.chdir(tmp_path)
    with atomic_output_dir(Path("rel") / "o") as tmp:  # a relative --out, and files written inside it
        write_json(tmp / "a.json", {"x": 1})
        write_json(tmp / "a.json", {"x": 2})
    assert json.loads((tmp_path / "rel" / "o" / "a.json").read_text()) == {"x": 2}
    assert partials(tmp_path) == []
