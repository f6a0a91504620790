"""Judged MM-Vet runs end to end through ``mmerase.eval.cli.main`` against a real local OpenAI-compatible server:
official numbers, kill-and-resume without repeated requests, failures never turned into scores, cost cap,
parse retries, backoff, concurrency bound, and the API key never reaching any output."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from fake_openai import FakeOpenAI, Reply  # noqa: E402

from mmerase.eval.cli import main  # noqa: E402
from mmerase.eval.mmvet import RETRY_SUFFIX_V1  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "eval"
META = FIX / "mmvet_small.json"
PREDS = FIX / "mmvet_small_predictions.json"
REPO = Path(__file__).resolve().parents[1]


def mmvet_argv(srv, out, *extra, preds=PREDS, runs=2):
    return ["mmvet", "--metadata", str(META), "--predictions", str(preds), "--judge-model", "judge-x-0613",
            "--base-url", srv.url, "--runs", str(runs), "--out", str(out), "--concurrency", "1",
            "--backoff-base", "0.001", "--backoff-max", "0.002", *extra]


@pytest.fixture
def key_env(monkeypatch):
    def set_key(srv):
        monkeypatch.setenv("OPENAI_API_KEY", srv.key)
    return set_key


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def summary(out):
    return json.loads((out / "mmvet_summary.json").read_text())


def cache_lines(out):
    """The records of the run's judge cache, after its header line (checked)."""
    p = out / "judge_cache.jsonl"
    text = p.read_text() if p.exists() else ""
    if not text:  # not made yet (a run being polled may be creating it)
        return []
    header, *lines = text.splitlines()
    assert json.loads(header) == {"mmerase_judge_cache": 1}
    return [json.loads(x) for x in lines if x.strip()]


def constant_predictions(tmp_path, value="0.7"):
    p = tmp_path / "const.json"
    preds = json.loads(PREDS.read_text())
    p.write_text(json.dumps({k: f"answer {k} #{value}#" for k in preds}))
    return p


def test_official_numbers_outputs_and_manifest(tmp_path, capsys, key_env):
    out = tmp_path / "out"
    with FakeOpenAI() as srv:
        key_env(srv)
        rc, stdout, err = run(mmvet_argv(srv, out, "--progress", "on"), capsys)
    assert rc == 0, err
    s = summary(out)
    agg = s["scores"]
    assert s["complete"] and s["status"] == "complete" and s["judgements"]["ok"] == 12
    assert agg["total"] == pytest.approx(50.0) and agg["std"] == pytest.approx(10 / 3)
    assert agg["capabilities"] == pytest.approx({"rec": 52.5, "ocr": 42.5, "math": 10.0, "know": 40.0, "gen": 40.0})
    assert agg["integrations"]["rec_ocr"] == pytest.approx(40.0)
    # every request: the official sampling settings, one user message
    assert {(r["temperature"], r["max_tokens"], r["model"]) for r in srv.requests} == {(0.0, 3, "judge-x-0613")}
    assert "total 50.0 (std 3.3 over 2 run(s))" in stdout
    assert "judging" in err and "cost=" in err  # progress bar when asked for
    md = (out / "mmvet_summary.md").read_text()
    assert "| mmvet_small_predictions | 52.5 | 42.5 | 10.0 | 40.0 | 40.0 | 50.0 | 3.3 | [53.3, 46.7] |" in md
    rows = [json.loads(x) for x in (out / "mmvet_judgements.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"v1_{i}" for i in range(6)]
    assert rows[0]["scores"] == [1.0, 0.8] and rows[0]["judgements"][1]["replies"] == ["0.8"]
    man = json.loads((out / "mmvet_manifest.json").read_text())
    assert man["inputs"]["metadata"]["sha256"] == hashlib.sha256(META.read_bytes()).hexdigest()
    assert man["inputs"]["predictions"]["sha256"] == hashlib.sha256(PREDS.read_bytes()).hexdigest()
    assert man["judge"] == {"model": "judge-x-0613", "server_models": ["judge-x-0613"], "api_key_env": "OPENAI_API_KEY"}
    assert man["versions"]["openai"] and man["versions"]["python"]
    assert s["usage"]["all_judgements"]["prompt_tokens"] == 12000 and s["usage"]["this_invocation"]["requests"] == 12


def test_resume_after_scripted_failure_repeats_nothing(tmp_path, capsys, key_env):
    broken = {"on": True}
    script = lambda req: Reply(500) if broken["on"] and req["n"] >= 5 else None  # noqa: E731
    out = tmp_path / "out"
    with FakeOpenAI(script=script) as srv:
        key_env(srv)
        rc, _, err = run(mmvet_argv(srv, out, "--max-retries", "0", "--max-failures", "0"), capsys)
        assert rc == 1
        assert len(err.strip().splitlines()) == 1 and "rerun" in err and "Traceback" not in err
        s = summary(out)
        assert not s["complete"] and s["scores"] is None and s["status"] == "stopped: failures"
        assert s["judgements"]["ok"] == 5 and s["judgements"]["error"] == 1 and s["judgements"]["pending"] == 6
        assert len(cache_lines(out)) == 5  # the failure is not cached
        broken["on"] = False
        rc, _, err = run(mmvet_argv(srv, out), capsys)
        assert rc == 0, err
        ok = srv.ok_requests()
    # each of the 6 prompts was answered exactly twice (runs 0 and 1) over both invocations: nothing repeated
    per_prompt: dict[str, int] = {}
    for r in ok:
        per_prompt[r["prompt"]] = per_prompt.get(r["prompt"], 0) + 1
    assert len(ok) == 12 and set(per_prompt.values()) == {2}
    assert summary(out)["usage"]["this_invocation"] == {**summary(out)["usage"]["this_invocation"],
                                                        "requests": 7, "cache_hits": 5}
    # identical to an uninterrupted run (fresh server, fresh folder)
    with FakeOpenAI() as srv2:
        key_env(srv2)
        assert run(mmvet_argv(srv2, tmp_path / "fresh"), capsys)[0] == 0
    assert summary(out)["scores"] == summary(tmp_path / "fresh")["scores"]


def test_killed_process_resumes_where_it_stopped(tmp_path, capsys, key_env):
    preds = constant_predictions(tmp_path)
    out = tmp_path / "out"
    with FakeOpenAI(delay=0.1) as srv:
        key_env(srv)
        env = {**os.environ, "OPENAI_API_KEY": srv.key, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-m", "mmerase.eval", *mmvet_argv(srv, out, preds=preds)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while len(cache_lines(out)) < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        answered = len(cache_lines(out))
        assert 4 <= answered < 12
        before = len(srv.requests)
        srv.delay = 0.0
        rc, _, err = run(mmvet_argv(srv, out, preds=preds), capsys)
        assert rc == 0, err
        asked_again = len(srv.requests) - before
    assert asked_again == 12 - answered  # nothing answered before the kill is asked again
    keys = [r["key"] for r in cache_lines(out)]
    assert len(keys) == len(set(keys)) == 12
    s = summary(out)
    assert s["usage"]["this_invocation"]["cache_hits"] == answered
    assert s["scores"]["total"] == pytest.approx(70.0) and s["scores"]["std"] == pytest.approx(0.0)


def test_changed_prediction_is_judged_again_and_torn_cache_line_is_reasked(tmp_path, capsys, key_env):
    preds = tmp_path / "p.json"
    data = json.loads(PREDS.read_text())
    preds.write_text(json.dumps(data))
    out = tmp_path / "out"
    with FakeOpenAI() as srv:
        key_env(srv)
        assert run(mmvet_argv(srv, out, preds=preds, runs=1), capsys)[0] == 0
        assert summary(out)["scores"]["total"] == pytest.approx(320 / 6)
        data["v1_2"] = "x = -1 or x = -5 #1.0#"  # the model's answer changed: its grade must change too
        preds.write_text(json.dumps(data))
        assert run(mmvet_argv(srv, out, preds=preds, runs=1), capsys)[0] == 0
        assert len(srv.requests) == 7
        assert summary(out)["scores"]["total"] == pytest.approx(420 / 6)
        # a kill while a record was being written leaves a torn last line: only that answer is asked again
        cache = out / "judge_cache.jsonl"
        text = cache.read_text()
        cache.write_text(text[:-40])
        rc, _, err = run(mmvet_argv(srv, out, preds=preds, runs=1), capsys)
        assert rc == 0 and "warning:" in err and "unreadable" in err
        assert len(srv.requests) == 8
    assert summary(out)["scores"]["total"] == pytest.approx(420 / 6)


def test_parse_failures_retry_hotter_then_stay_null(tmp_path, capsys, key_env):
    preds = tmp_path / "p.json"
    data = json.loads(PREDS.read_text())
    data["v1_0"] = "flaky cat"
    data["v1_1"] = "garbage sign"
    preds.write_text(json.dumps(data))

    def script(req):
        if "flaky cat | " in req["prompt"]:
            k = sum("flaky cat | " in r["prompt"] for r in srv.requests) - 1  # this is the k-th ask for it
            return Reply(content={0: "Sure", 1: "I think"}.get(k, "0.6 because"))
        if "garbage sign | " in req["prompt"]:
            return Reply(content="The prediction")
        return None

    out = tmp_path / "out"
    with FakeOpenAI(script=script) as srv:
        key_env(srv)
        rc, _, err = run(mmvet_argv(srv, out, preds=preds, runs=1), capsys)
        assert rc == 0, err
        flaky = [r for r in srv.requests if "flaky cat | " in r["prompt"]]
        garbage = [r for r in srv.requests if "garbage sign | " in r["prompt"]]
        assert [r["temperature"] for r in flaky] == [0.0, 0.0, 0.5]
        assert not flaky[0]["prompt"].endswith(RETRY_SUFFIX_V1)
        assert all(r["prompt"].endswith(RETRY_SUFFIX_V1) for r in flaky[1:])
        assert [r["temperature"] for r in garbage] == [0.0, 0.0, 0.5, 1.0, 1.5]
        s = summary(out)
        rows = {json.loads(x)["id"]: json.loads(x) for x in (out / "mmvet_judgements.jsonl").read_text().splitlines()}
        assert rows["v1_0"]["scores"] == [0.6] and rows["v1_0"]["judgements"][0]["replies"] == ["Sure", "I think",
                                                                                                 "0.6 because"]
        j = rows["v1_1"]["judgements"][0]
        assert rows["v1_1"]["scores"] == [None] and j["status"] == "unparseable" and len(j["replies"]) == 5
        assert s["judgements"]["unparseable"] == 1 and s["failures"][0]["id"] == "v1_1"
        # official rule: counted as 0.0 in the scores -- and said so
        assert s["scores"]["total"] == pytest.approx(100 * (0.6 + 0.0 + 0.0 + 0.4 + 1.0 + 0.3) / 6)
        assert "counted as 0.0" in (out / "mmvet_summary.md").read_text()
        n = len(srv.requests)
        rc, _, err = run(mmvet_argv(srv, out, "--unparseable", "failure", preds=preds, runs=1), capsys)
        assert rc == 1 and summary(out)["scores"] is None and "without a score" in err
        assert len(srv.requests) == n  # the replies are cached; the failure is not turned into a score


def test_failure_threshold_stops_and_caches_no_failure(tmp_path, capsys, key_env):
    out = tmp_path / "out"
    with FakeOpenAI(script=lambda req: Reply(500)) as srv:
        key_env(srv)
        rc, _, err = run(mmvet_argv(srv, out, "--max-retries", "1", "--max-failures", "2"), capsys)
    assert rc == 1 and "--max-failures 2" in err and len(err.strip().splitlines()) == 1
    assert len(srv.requests) == 6  # 3 failed judgements x (1 try + 1 retry), then stop
    s = summary(out)
    assert s["judgements"] == {"total": 12, "ok": 0, "unparseable": 0, "error": 3, "rejected": 0, "pending": 9}
    assert s["scores"] is None and cache_lines(out) == []
    rows = [json.loads(x) for x in (out / "mmvet_judgements.jsonl").read_text().splitlines()]
    assert rows[0]["scores"] == [None, None] and "HTTP 500" in rows[0]["judgements"][0]["error"]


def test_400_is_not_retried_and_leaves_the_run_incomplete(tmp_path, capsys, key_env):
    out = tmp_path / "out"
    broken = {"on": True}
    script = lambda req: Reply(400) if broken["on"] and "It says OPEN" in req["prompt"] else None  # noqa: E731
    with FakeOpenAI(script=script) as srv:
        key_env(srv)
        rc, _, err = run(mmvet_argv(srv, out, runs=1), capsys)
        assert rc == 1 and "without a score" in err
        assert sum("It says OPEN" in r["prompt"] for r in srv.requests) == 1 and len(srv.requests) == 6
        s = summary(out)
        assert s["judgements"]["error"] == 1 and s["scores"] is None and "400" in s["failures"][0]["error"]
        # the official v2 rule, on request: a rejected request scores 0.0 (and is asked once more, not cached)
        rc, _, err = run(mmvet_argv(srv, out, "--rejected", "zero", runs=1), capsys)
        assert rc == 0 and len(srv.requests) == 7
        assert summary(out)["scores"]["total"] == pytest.approx(100 * 2.7 / 6)
        assert "rejected by the judge" in (out / "mmvet_summary.md").read_text()
        broken["on"] = False
        assert run(mmvet_argv(srv, out, runs=1), capsys)[0] == 0
        assert len(srv.requests) == 8
    assert summary(out)["scores"]["total"] == pytest.approx(320 / 6)


def test_retry_after_and_timeout_through_the_cli(tmp_path, capsys, key_env):
    plan = {0: Reply(429, headers={"Retry-After": "0.25"}), 1: Reply(503), 2: Reply(delay=0.8)}
    times: list[float] = []

    def script(req):
        times.append(time.monotonic())
        return plan.get(req["n"])

    out = tmp_path / "out"
    with FakeOpenAI(script=script) as srv:
        key_env(srv)
        rc, _, err = run(mmvet_argv(srv, out, "--timeout", "0.3", runs=1), capsys)
    assert rc == 0, err
    assert times[1] - times[0] >= 0.25  # waited as long as the server asked, not the 1-2 ms backoff
    s = summary(out)
    assert s["usage"]["this_invocation"]["retries"] == 3 and s["usage"]["this_invocation"]["requests"] == 6
    assert s["scores"]["total"] == pytest.approx(320 / 6)


def test_cost_cap_stops_cleanly_and_resumes(tmp_path, capsys, key_env):
    out = tmp_path / "out"
    price = ["--price-in", "1000", "--price-out", "0"]  # the server reports 1000 prompt tokens: $1 per request
    # before sending, each request reserves its upper bound: (1640..1700 prompt bytes + 16) tokens = $1.66..1.72;
    # with $4.2 the third request fits (2 + 1.7) and a fourth would not (3 + 1.7)
    with FakeOpenAI(usage=(1000, 1)) as srv:
        key_env(srv)
        rc, _, err = run(mmvet_argv(srv, out, *price, "--max-cost", "4.2"), capsys)
        assert rc == 3 and "cost cap" in err and "resume" in err
        assert len(srv.requests) == 3
        s = summary(out)
        assert s["status"] == "stopped: cost" and s["judgements"]["ok"] == 3 and s["judgements"]["pending"] == 9
        assert s["usage"]["this_invocation"]["cost_usd"] == pytest.approx(3.0)
        assert len(cache_lines(out)) == 3
        rc, _, err = run(mmvet_argv(srv, out, *price, "--max-cost", "100"), capsys)
        assert rc == 0, err
        assert len(srv.requests) == 12
    s = summary(out)
    assert s["usage"]["this_invocation"]["cost_usd"] == pytest.approx(9.0)
    assert s["usage"]["all_judgements"]["cost_usd"] == pytest.approx(12.0)
    assert [r["cost_usd"] for r in s["usage"]["all_judgements"]["by_run"]] == pytest.approx([6.0, 6.0])
    assert s["scores"]["total"] == pytest.approx(50.0)


def test_cost_cap_holds_with_concurrent_requests(tmp_path, capsys, key_env):
    preds = constant_predictions(tmp_path, "0.5")
    out = tmp_path / "out"
    with FakeOpenAI(usage="bytes", delay=0.02) as srv:  # bills one token per prompt byte (+16): the worst case
        key_env(srv)
        argv = mmvet_argv(srv, out, "--price-in", "1000", "--price-out", "1000", "--max-cost", "10", preds=preds)
        argv[argv.index("--concurrency") + 1] = "4"
        rc, _, err = run(argv, capsys)
    assert rc == 3, err
    spent = summary(out)["usage"]["this_invocation"]["cost_usd"]
    per_request = spent / len(srv.requests)  # ~ $1.7
    assert spent <= 10.0 and spent > 10.0 - 2 * per_request and srv.max_in_flight >= 2


@pytest.mark.parametrize("concurrency", ["1", "4"])
def test_capped_run_spends_up_to_one_bound_below_the_cap(tmp_path, capsys, key_env, concurrency):
    """Requests settle at about a quarter of their reserved bound: with four in flight a reservation that does not
    fit beside them must wait for them to settle rather than end the run."""
    preds = constant_predictions(tmp_path, "0.5")
    out = tmp_path / "out"
    with FakeOpenAI(usage=(400, 1), delay=0.05) as srv:  # bills 400 prompt tokens for ~1650-byte prompts
        key_env(srv)
        argv = mmvet_argv(srv, out, "--price-in", "1", "--price-out", "1", "--max-cost", "0.005", preds=preds,
                          runs=3)
        argv[argv.index("--concurrency") + 1] = concurrency
        rc, _, err = run(argv, capsys)
    assert rc == 3, err
    spent = summary(out)["usage"]["this_invocation"]["cost_usd"]
    assert spent == pytest.approx(401e-6 * len(srv.requests))
    # the stop message names what the request that did not fit would have reserved: its bound, one token per byte
    stop = summary(out)["stop_message"]
    m = re.search(r"spent \$([0-9.]+) of --max-cost \$0\.005000; the next request would reserve its upper bound "
                  r"\$([0-9.]+) \((\d+) prompt \+ 3 completion tokens\)", stop)
    assert m and float(m[1]) == pytest.approx(spent, abs=1e-6) and "nothing else in flight" in stop
    bound = float(m[2])
    assert bound == pytest.approx((int(m[3]) + 3) / 1e6, abs=1e-6) and int(m[3]) > 1600
    assert 0.005 - bound < spent <= 0.005, (spent, bound, len(srv.requests))
    assert len(srv.requests) == 9  # 8 × $0.000401 + the bound fits under $0.005, 9 × $0.000401 + the bound does not
    if concurrency == "4":
        assert srv.max_in_flight >= 2


def test_concurrency_is_bounded(tmp_path, capsys, key_env):
    preds = constant_predictions(tmp_path, "0.5")
    with FakeOpenAI(delay=0.05) as srv:
        key_env(srv)
        argv = mmvet_argv(srv, tmp_path / "out", preds=preds, runs=2)
        argv[argv.index("--concurrency") + 1] = "3"
        rc, _, err = run(argv, capsys)
    assert rc == 0, err
    assert 2 <= srv.max_in_flight <= 3 and len(srv.requests) == 12
    assert summary(tmp_path / "out")["scores"]["total"] == pytest.approx(50.0)


def test_mmvet_v2_and_azure_endpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    with FakeOpenAI() as srv:
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", srv.key)  # the default key variable with --azure
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        argv = ["mmvet", "--metadata", str(FIX / "mmvet_v2_small.json"), "--predictions",
                str(FIX / "mmvet_v2_small_predictions.jsonl"), "--judge-model", "judge-x-0613", "--azure",
                "--base-url", srv.url.removesuffix("/v1"), "--out", str(out)]
        rc, _, err = run(argv, capsys)
    assert rc == 0, err
    assert all(r["path"].startswith("/openai/deployments/judge-x-0613/chat/completions?api-version=")
               for r in srv.requests)
    prompts = "\n".join(r["prompt"] for r in srv.requests)
    assert "| Which picture continues the pattern?<image><image> | the second <OR> B | B #1.0# | " in prompts
    assert "| hello<br>there #0.5# | " in prompts
    s = summary(out)
    assert s["benchmark"] == "mm-vet-v2" and s["scores"]["capabilities"]["seq"] == pytest.approx(100.0)
    assert s["scores"]["total"] == pytest.approx(50.0)


def test_api_key_never_printed_or_written(tmp_path, capsys, monkeypatch):
    secret = "sk-SECRET-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:24]
    echo = lambda req: Reply(400, body={"error": {"message": f"bad request from {req['auth']}"}})  # noqa: E731
    seen = []
    with FakeOpenAI(key=secret) as srv:
        monkeypatch.setenv("OPENAI_API_KEY", secret)
        seen.append(run(mmvet_argv(srv, tmp_path / "ok"), capsys))
        srv.script = echo  # a server that echoes the credentials it got in its error messages
        seen.append(run(mmvet_argv(srv, tmp_path / "echo", "--max-failures", "0"), capsys))
        srv.script = None
        srv.key = "another-key-than-ours"  # now ours is refused: 401 (fatal)
        seen.append(run(mmvet_argv(srv, tmp_path / "denied"), capsys))
    assert [rc for rc, _, _ in seen] == [0, 1, 1]
    assert "***" in json.dumps(summary(tmp_path / "echo")["failures"])  # the echoed key was redacted
    assert "401" in seen[2][2]
    for rc, out, err in seen:
        assert secret not in out and secret not in err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 12
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
