"""Hostile and careless input to ``mmerase eval mmvet`` through the real CLI (``mmerase.cli.main``): nothing lost,
nothing blown up, every mistake one clear line.

Each refused case must exit 2 with ONE stderr line (no traceback) of at most 1000 bytes that names the file or option
at fault, leave every input file byte for byte as it was (sha256), create no output folder and leave no
``.partial-`` file. The judge cache in particular: mmerase writes to no file it did not create, so ``--cache`` pointed
by mistake at the predictions, at an adapter's safetensors or at any file whose first line is not the cache header is
refused without being opened for writing. The positive cases: a cache made by a run is reused by the next one, and a
torn last line in it (a kill while writing) is dropped while the records before it survive.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from fake_openai import FakeOpenAI  # noqa: E402

from mmerase.cli import main  # noqa: E402

HEADER = b'{"mmerase_judge_cache": 1}\n'
IDS = ["q0", "q1", "q2"]


# ---------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def srv(monkeypatch):
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_API_KEY", server.key)
        yield server


def write_inputs(root: Path) -> tuple[Path, Path]:
    """A small MM-Vet v1 metadata file and its predictions (scores written into them for the fake judge)."""
    meta = root / "meta.json"
    meta.write_text(json.dumps({i: {"question": f"What is {i}?", "answer": f"{i} <OR> it",
                                    "capability": ["rec", "ocr"]} for i in IDS}))
    preds = root / "preds.json"
    preds.write_text(json.dumps({i: f"it is {i} #0.{k + 4}#" for k, i in enumerate(IDS)}))
    return meta, preds


def argv(srv, meta: Path, preds: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "mmvet", "--metadata", str(meta), "--predictions", str(preds), "--judge-model", "judge-x-0613",
            "--base-url", srv.url, "--out", str(out), "--concurrency", "1", "--progress", "off",
            "--backoff-base", "0.001", "--backoff-max", "0.002", *extra]


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_refused(rc: int, err: str, root: Path, before: dict[str, str], out: Path, *named: str) -> str:
    """Exit 2, one bounded line naming ``named``, inputs unchanged, nothing written."""
    assert rc == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, repr(err[:2000])
    assert "Traceback" not in err and len(err.encode("utf-8")) <= 1000, len(err.encode("utf-8"))
    assert "\x1b" not in err and "\r" not in err
    for name in named:
        assert name in err, (name, err)
    assert hashes(root) == before  # every input file byte for byte as it was
    assert not out.exists()  # refused before any output (or lock) was made
    assert not [p for p in root.rglob("*") if ".partial-" in p.name]
    return err


# ---------------------------------------------------------------------------------------------- the judge cache
def test_cache_pointed_at_the_predictions_file_is_refused_untouched(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out, "--cache", str(preds)), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(preds), "--cache", "--predictions")
    assert srv.requests == []


def test_cache_pointed_at_a_copy_of_the_predictions_is_not_a_judge_cache(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    other = tmp_path / "other_predictions.json"
    other.write_bytes(preds.read_bytes())  # not one of this run's inputs: only the header check stands in the way
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out, "--cache", str(other)), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(other), "not an mmerase judge cache")
    assert srv.requests == []


def _safetensors(path: Path) -> None:
    torch = pytest.importorskip("torch")
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file({"lora_A.weight": torch.randn(8, 4), "lora_B.weight": torch.zeros(4, 8)}, str(path))


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(64 * 1024))


@pytest.mark.parametrize("make", [_safetensors, _random_bytes], ids=["safetensors", "random-bytes"])
def test_cache_pointed_at_a_binary_file_is_refused_untouched(tmp_path, capsys, srv, make):
    meta, preds = write_inputs(tmp_path)
    adapter = tmp_path / "adapter" / "adapter_model.safetensors"
    adapter.parent.mkdir()
    make(adapter)
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out, "--cache", str(adapter)), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(adapter), "not an mmerase judge cache")
    assert srv.requests == []


@pytest.mark.parametrize("text", [
    "my notes\nline two is not JSON and has no newline",  # the old repair would have cut this last line off
    '{"key": "abc", "content": "0.5"}\n{"key": "de',  # a cache from before caches had a header, torn at its end
    "\n",  # one empty line: not empty, so not ours to fill
], ids=["notes", "headerless-cache", "newline-only"])
def test_cache_at_a_text_file_that_is_not_a_cache_is_refused_untouched(tmp_path, capsys, srv, text):
    meta, preds = write_inputs(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text(text)
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out, "--cache", str(notes)), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(notes), "not an mmerase judge cache")
    assert notes.read_text() == text
    if "key" in text:
        assert "insert that line" in err  # says how to reuse an old cache
    assert srv.requests == []


def test_cache_of_another_format_version_is_refused(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"mmerase_judge_cache": 2}\n{"key": "k", "content": "0.5"}\n')
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out, "--cache", str(cache)), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(cache), "format 2")


def test_cache_at_a_folder_or_a_fifo_is_refused_without_hanging(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    folder = tmp_path / "somefolder"
    folder.mkdir()
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out, "--cache", str(folder)), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(folder), "folder")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        rc, _, err = run(argv(srv, meta, preds, out, "--cache", str(fifo)), capsys)
        assert_refused(rc, err, tmp_path, before, out, str(fifo), "not a regular file")


# ----------------------------------------------------------------------------------------------------- metadata
def test_metadata_with_a_duplicate_key_is_refused(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    meta.write_text('{"q0": {"question": "What is q0?", "answer": "q0", "answer": "something else", '
                    '"capability": ["rec"]}, "q1": {"question": "?", "answer": "q1", "capability": ["rec"]}, '
                    '"q2": {"question": "?", "answer": "q2", "capability": ["rec"]}}')
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(meta), "'answer'", "twice")
    assert srv.requests == []


@pytest.mark.parametrize("layout", ["list", "in-a-sample", "jsonl"])
def test_deeply_nested_metadata_is_refused(tmp_path, capsys, srv, layout):
    meta, preds = write_inputs(tmp_path)
    deep = "[" * 10_000 + "]" * 10_000
    if layout == "list":
        meta.write_text(deep)
    elif layout == "in-a-sample":
        meta.write_text('{"q0": {"question": ' + deep + ', "answer": "a", "capability": ["rec"]}}')
    else:
        meta = tmp_path / "meta.jsonl"
        meta.write_text('{"question_id": "q0", "question": "?", "answer": "a", "capability": ["rec"]}\n'
                        '{"question_id": "q1", "question": ' + deep + ', "answer": "a", "capability": ["rec"]}\n')
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(meta), "nested deeper than 100")
    if layout == "jsonl":
        assert f"{meta}:2:" in err  # the line
    assert srv.requests == []


HOSTILE_ID = "q\x1b[31mred\nsecond line" + "x" * 10_000_000  # 10 MB, a terminal escape and a newline


def test_a_huge_id_with_an_escape_and_a_newline_is_shown_bounded_and_escaped(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    data = json.loads(meta.read_text())
    data[HOSTILE_ID] = {"question": "?", "capability": ["rec"]}  # no 'answer'
    meta.write_text(json.dumps(data))
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(meta), "'answer'", "\\x1b[31m", "\\n")
    assert "more characters" in err  # the rest of the id is counted, not printed


def test_a_huge_id_without_a_prediction_is_shown_bounded_and_escaped(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    data = json.loads(meta.read_text())
    data[HOSTILE_ID] = {"question": "?", "answer": "a", "capability": ["rec"]}
    meta.write_text(json.dumps(data))
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out), capsys)
    assert_refused(rc, err, tmp_path, before, out, str(preds), "no prediction", "\\x1b[31m", "\\n")


def test_a_huge_option_value_is_one_bounded_line(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    out = tmp_path / "out"
    before = hashes(tmp_path)
    rc, _, err = run(argv(srv, meta, preds, out, "--unparseable", "z\x1b[2J\n" * 100_000), capsys)
    assert_refused(rc, err, tmp_path, before, out, "--unparseable")


# ------------------------------------------------------------------------------------------ a cache that is ours
def test_a_cache_made_by_a_run_is_reused_and_a_torn_last_line_is_dropped(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    cache = tmp_path / "judge.jsonl"
    out = tmp_path / "out"
    rc, stdout, err = run(argv(srv, meta, preds, out, "--cache", str(cache)), capsys)
    assert rc == 0, err
    assert len(srv.requests) == 3
    data = cache.read_bytes()
    assert data.startswith(HEADER) and data.count(b"\n") == 4  # the header, then one record per judgement
    first = json.loads((out / "mmvet_summary.json").read_text())["scores"]

    # resume: a second run into another folder asks nothing
    rc, _, err = run(argv(srv, meta, preds, tmp_path / "out2", "--cache", str(cache)), capsys)
    assert rc == 0, err
    assert len(srv.requests) == 3 and cache.read_bytes() == data
    again = json.loads((tmp_path / "out2" / "mmvet_summary.json").read_text())
    assert again["usage"]["this_invocation"]["cache_hits"] == 3 and again["scores"] == first

    # a kill while the last record was written: that line is dropped, the ones before it survive, it is re-asked
    keep = data[: data.rstrip(b"\n").rfind(b"\n") + 1]
    cache.write_bytes(data[:-25])
    rc, _, err = run(argv(srv, meta, preds, tmp_path / "out3", "--cache", str(cache)), capsys)
    assert rc == 0, err
    assert err.count("\n") == 1 and "warning:" in err and "unreadable" in err
    assert len(srv.requests) == 4
    now = cache.read_bytes()
    assert now.startswith(keep) and now.count(b"\n") == 4  # earlier records kept as they were, nothing glued
    assert [json.loads(x)["key"] for x in now[len(HEADER):].splitlines()] == \
        [json.loads(x)["key"] for x in data[len(HEADER):].splitlines()]
    assert json.loads((tmp_path / "out3" / "mmvet_summary.json").read_text())["scores"] == first


def test_the_default_cache_in_the_out_folder_resumes(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    out = tmp_path / "out"
    assert run(argv(srv, meta, preds, out), capsys)[0] == 0
    cache = out / "judge_cache.jsonl"
    assert cache.read_bytes().startswith(HEADER)
    rc, _, err = run(argv(srv, meta, preds, out), capsys)
    assert rc == 0, err
    assert len(srv.requests) == 3
    assert json.loads((out / "mmvet_summary.json").read_text())["usage"]["this_invocation"]["cache_hits"] == 3


def test_an_empty_file_becomes_a_cache(tmp_path, capsys, srv):
    meta, preds = write_inputs(tmp_path)
    cache = tmp_path / "empty.jsonl"
    cache.touch()
    rc, _, err = run(argv(srv, meta, preds, tmp_path / "out", "--cache", str(cache)), capsys)
    assert rc == 0, err
    data = cache.read_bytes()
    assert data.startswith(HEADER) and data.count(b"\n") == 4
