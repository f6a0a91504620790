"""Judge client against a real local HTTP server: backoff honouring Retry-After, timeouts, no retry on 400, fatal
401, the append-only cache (keys, torn lines), and the cost meter."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from fake_openai import FakeOpenAI, Reply  # noqa: E402

from mmerase.eval.errors import UserError  # noqa: E402
from mmerase.eval.judge import (  # noqa: E402
    Judge,
    JudgeAPIError,
    JudgeCache,
    HEADER_LINE,
    JudgeStopped,
    OpenAIBackend,
    RetryPolicy,
    cache_key,
    parse_retry_after,
)
from mmerase.eval.pricing import CostMeter, Price, lookup_price, parse_price_table  # noqa: E402


def make_judge(srv, tmp_path, *, timeout=5.0, retry=None, meter=None, waits=None):
    backend = OpenAIBackend("judge-x-0613", api_key=srv.key, base_url=srv.url, timeout=timeout)
    return Judge(backend, JudgeCache(tmp_path / "cache.jsonl"), model="judge-x-0613",
                 retry=retry or RetryPolicy(max_retries=4, base=0.01, max_wait=1.0),
                 meter=meter, sleep=(waits.append if waits is not None else None), rng=random.Random(0))


def ask(judge, prompt="grade #0.5#", run=0):
    return judge.ask(prompt, prediction="p", temperature=0.0, run=run, max_tokens=3)


def test_backoff_honours_retry_after_and_retries_5xx_and_timeouts(tmp_path):
    plan = iter([Reply(429, headers={"Retry-After": "0.3"}), Reply(503), Reply(delay=1.0), None])
    with FakeOpenAI(script=lambda req: next(plan)) as srv:
        waits: list[float] = []
        judge = make_judge(srv, tmp_path, timeout=0.3, waits=waits)
        comp, cached = ask(judge)
    assert (comp.content, comp.model, cached) == ("0.5", "judge-x-0613", False)
    assert [r["status"] for r in srv.requests] == [429, 503, 200, 200]  # 3rd timed out on the client side
    assert len(waits) == 3 and judge.stats.retries == 3
    assert waits[0] >= 0.3  # Retry-After wins over the 0.005-0.01 s backoff
    assert 0.01 <= waits[1] <= 0.02 and 0.02 <= waits[2] <= 0.04  # doubling, jittered in [d/2, d]
    assert len(judge.cache) == 1


def test_gives_up_after_max_retries_and_caches_nothing(tmp_path):
    with FakeOpenAI(script=lambda req: Reply(500)) as srv:
        judge = make_judge(srv, tmp_path, retry=RetryPolicy(max_retries=2, base=0.001, max_wait=0.001), waits=[])
        with pytest.raises(JudgeAPIError) as ei:
            ask(judge)
    assert ei.value.status == 500 and ei.value.retryable
    assert len(srv.requests) == 3
    assert len(judge.cache) == 0 and (tmp_path / "cache.jsonl").read_bytes() == HEADER_LINE  # the header only


def test_no_retry_on_400(tmp_path):
    with FakeOpenAI(script=lambda req: Reply(400, body={"error": {"message": "context too long"}})) as srv:
        judge = make_judge(srv, tmp_path, waits=[])
        with pytest.raises(JudgeAPIError) as ei:
            ask(judge)
    assert len(srv.requests) == 1
    assert ei.value.status == 400 and not ei.value.retryable and "context too long" in str(ei.value)
    assert len(judge.cache) == 0 and not judge.stop.is_set()


def test_auth_failure_is_fatal_and_stops_everyone(tmp_path):
    with FakeOpenAI() as srv:
        backend = OpenAIBackend("judge-x-0613", api_key="wrong-key-000", base_url=srv.url)
        judge = Judge(backend, JudgeCache(tmp_path / "c.jsonl"), model="judge-x-0613", sleep=lambda s: None)
        with pytest.raises(JudgeAPIError) as ei:
            ask(judge)
        assert ei.value.fatal and ei.value.status == 401
        assert judge.stop.is_set() and judge.stop_reason == "fatal"
        with pytest.raises(JudgeStopped):
            ask(judge, prompt="another #0.1#")
    assert len(srv.requests) == 1


def test_cache_hit_asks_nothing_and_key_depends_on_every_input(tmp_path):
    with FakeOpenAI() as srv:
        judge = make_judge(srv, tmp_path)
        ask(judge)
        comp, cached = ask(judge)
        assert cached and comp.content == "0.5" and len(srv.requests) == 1
        ask(judge, run=1)  # another run index is another question
        assert len(srv.requests) == 2
    base = dict(model="m", prompt="p", prediction="x", temperature=0.0, run=0, max_tokens=3)
    k0 = cache_key(**base)
    for field, value in [("model", "m2"), ("prompt", "p2"), ("prediction", "y"), ("temperature", 0.5),
                         ("run", 1), ("max_tokens", 4)]:
        assert cache_key(**{**base, field: value}) != k0, field
    # a fresh cache object (a new process) sees the recorded answers
    again = JudgeCache(tmp_path / "cache.jsonl")
    assert len(again) == 2


def test_cache_skips_a_torn_last_line_and_keeps_appending_cleanly(tmp_path):
    path = tmp_path / "cache.jsonl"
    c = JudgeCache(path)
    c.put("k1", {"content": "0.5"})
    c.put("k2", {"content": "0.7"})
    c.close()
    text = path.read_text()
    assert text.startswith(HEADER_LINE.decode())
    path.write_text(text[: len(text) - 20])  # killed while writing the second record
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        c2 = JudgeCache(path)
    assert c2.get("k1")["content"] == "0.5" and c2.get("k2") is None and c2.bad_lines == 1
    c2.put("k2", {"content": "0.7"})
    c2.close()
    header, *lines = path.read_text().splitlines(keepends=True)
    assert header.encode() == HEADER_LINE
    assert [json.loads(ln)["key"] for ln in lines] == ["k1", "k2"]  # torn tail dropped, nothing glued to it
    # a complete record that only lost its newline is kept
    path.write_text(path.read_text().rstrip("\n"))
    c3 = JudgeCache(path)
    c3.put("k3", {"content": "0.9"})
    c3.close()
    header, *lines = path.read_text().splitlines(keepends=True)
    assert header.encode() == HEADER_LINE
    assert [json.loads(ln)["key"] for ln in lines] == ["k1", "k2", "k3"]


def test_cache_writes_only_to_a_file_it_made(tmp_path):
    foreign = tmp_path / "predictions.jsonl"
    foreign.write_text('{"question_id": 1, "text": "a"}\nnot json, no newline')
    before = foreign.read_bytes()
    with pytest.raises(UserError, match="not an mmerase judge cache"):
        JudgeCache(foreign)
    assert foreign.read_bytes() == before  # neither truncated nor appended to
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    JudgeCache(empty).close()
    assert empty.read_bytes() == HEADER_LINE  # an empty file loses nothing by becoming a cache
    bare = tmp_path / "bare.jsonl"
    bare.write_bytes(HEADER_LINE.rstrip(b"\n"))  # the header without its newline is finished, never cut
    c = JudgeCache(bare)
    c.put("k1", {"content": "0.5"})
    c.close()
    assert bare.read_bytes().startswith(HEADER_LINE) and JudgeCache(bare).get("k1")["content"] == "0.5"
    nested = tmp_path / "made" / "here" / "cache.jsonl"  # a missing folder is made for a new cache
    JudgeCache(nested).close()
    assert nested.read_bytes() == HEADER_LINE


def test_cost_meter_reserves_and_caps(tmp_path):
    price = Price(1000.0, 0.0, "test")  # 1000 prompt tokens cost $1
    meter = CostMeter(price, max_cost=2.5)
    with FakeOpenAI(usage=(1000, 1)) as srv:  # bills 1000 tokens for a 7-byte prompt: more than one per byte
        judge = make_judge(srv, tmp_path, meter=meter)
        ask(judge, "a #0.1#")
        assert meter.upper_bound(7, 3) == pytest.approx(1.0, abs=2e-3)  # learnt: the bound now covers what it bills
        ask(judge, "b #0.2#")
        with pytest.raises(JudgeStopped):
            ask(judge, "c #0.3#")  # 2.0 spent + 1.0 bound > 2.5
    assert len(srv.requests) == 2 and meter.spent == pytest.approx(2.0)
    assert judge.stop_reason == "cost" and meter.prompt_tokens == 2000 and meter.completion_tokens == 2
    assert json.loads((tmp_path / "cache.jsonl").read_text().splitlines()[1])["cost"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="price"):
        CostMeter(None, max_cost=1.0)


def test_concurrent_reservations_never_overshoot():
    meter = CostMeter(Price(50_000.0, 0.0, "test"), max_cost=5.0)  # 20 tokens = $1
    assert meter.upper_bound(4, 0) == pytest.approx(1.0)  # 4 bytes + 16 framing tokens
    granted = []

    def worker():
        try:
            r = meter.reserve(prompt_bytes=4, max_tokens=0)
        except Exception:
            return
        granted.append(r)
        time.sleep(0.01)
        meter.settle(r, 20, 0, estimated=False, prompt_bytes=4)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 5 and meter.spent == pytest.approx(5.0)


def test_price_lookup_and_retry_after_parsing():
    assert lookup_price("gpt-4-0613").input_per_mtok == 30.0
    assert lookup_price("gpt-4o-mini-2024-07-18").source.startswith("gpt-4o-mini ")  # longest dated prefix
    assert lookup_price("my-local-judge") is None
    table = parse_price_table({"my-local-judge": {"input": 1, "output": 2}}, "t")
    assert lookup_price("my-local-judge", table).output_per_mtok == 2.0
    with pytest.raises(UserError):
        parse_price_table({"m": {"input": 1}}, "t")
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None
