"""MM-Vet (v1 and v2) judged evaluation, following the official evaluator's procedure.

Procedure (official ``mm-vet_evaluator.py`` / ``mm-vet-v2_evaluator.py``; deviations are named options):

- Prompt: a few-shot instruction with a Markdown table of worked examples whose ground truths use ``<AND>``/``<OR>``,
  then the sample's row ``question | ground truth | prediction |`` left for the judge to complete. ``<AND>``/``<OR>``
  in the ground truth get spaces around them. v2 replaces ``<IMG>file.jpg`` segments of the question by ``<image>``,
  newlines by ``<br>`` and uses outer table pipes. The instruction and examples here are our own text; pass
  ``prompt_preamble`` (``--prompt-file``) to use another preamble verbatim, or ``--official-evaluator`` to take the
  prompt and retry wording from your copy of the official script (:mod:`mmerase.eval.mmvet_official`).
- One user message, temperature 0, ``max_tokens`` 3. The score is the reply's first space-separated token as a float
  in [0, 1]. On a parse failure the prompt gets a short "answer with the number" suffix and is asked again, the k-th
  retry at temperature ``T0 + 0.5 (k-1)`` (the official schedule: 0.0, 0.0, 0.5, 1.0, 1.5). The official script then
  makes a sixth request at 2.0 whose reply it never reads and scores 0.0; we skip that request (same scores, one
  paid request fewer).
- N runs (default 1; the paper used 5) ask the same question again per run. Per-capability score of a run =
  mean over the samples having that capability x100; reported = mean over runs; ``std`` = population std of the
  per-run totals; plus the same table per capability *combination*.

Failures, which the official script silently stores as 0.0: a reply that stays unparseable is recorded as null with
its replies; it then counts as 0.0 in the scores — the official rule — and is listed in the report, or with
``unparseable="failure"`` leaves the run without a score. A judge request that fails (after its retries, or a
400-class rejection, which is never retried) is null and never scored by default: the run is reported incomplete and
a rerun asks only those again; ``rejected="zero"`` scores *rejections* 0.0 as the official v2 script does.
Grades are cached by a hash of the full prompt (so a changed prediction is re-judged), not by sample id.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import read_json_or_jsonl, shown

PREAMBLE_V1 = """\
You are grading the answers of an AI assistant. Compare the prediction with the ground truth and give a \
correctness score. Inside a ground truth, <AND> joins elements that must all appear in the prediction for it to be \
fully right, and <OR> joins alternatives, any one of which makes it fully right; partly right predictions get \
partial credit. The score is one of 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 or 1.0 \
(totally right). Fill in only the empty Correctness cell of the last row.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
Which two numbers solve the puzzle? | 4 <AND> 9 | 4 and 9 | 1.0
Which two numbers solve the puzzle? | 4 <AND> 9 | The answer is 4. | 0.5
Which two numbers solve the puzzle? | 4 <AND> 9 | 9, or maybe 6 | 0.5
Which two numbers solve the puzzle? | 4 <AND> 9 | 3 and 8 | 0.0
What colour is the umbrella? | red <OR> crimson | It is a crimson umbrella. | 1.0
What colour is the umbrella? | red <OR> crimson | The umbrella is blue. | 0.0
Why is this picture funny? | A cat sleeps in a cardboard box labelled "security system" by the front door: the joke \
is that the household's security is a pet that is not paying attention. | A cat is lying in a box near a door. | 0.3
Why is this picture funny? | A cat sleeps in a cardboard box labelled "security system" by the front door: the joke \
is that the household's security is a pet that is not paying attention. | The box says "security system" but the \
guard is a cat fast asleep, so the house is "protected" by someone who is not watching at all. | 1.0
"""

PREAMBLE_V2 = """\
You are grading the answers of an AI assistant. Compare the prediction with the ground truth and give a \
correctness score. <image> in a question marks where an image was shown. Inside a ground truth, <AND> joins \
elements that must all appear in the prediction for it to be fully right, and <OR> joins alternatives, any one of \
which makes it fully right; partly right predictions get partial credit. The score is one of 0.0 (totally wrong), \
0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 or 1.0 (totally right). Fill in only the empty Correctness cell of the \
last row.

| Question | Ground truth | Prediction | Correctness |
| --- | --- | --- | --- |
| Which two numbers solve the puzzle?<image> | 4 <AND> 9 | 4 and 9 | 1.0 |
| Which two numbers solve the puzzle?<image> | 4 <AND> 9 | The answer is 4. | 0.5 |
| Which two numbers solve the puzzle?<image> | 4 <AND> 9 | 9, or maybe 6 | 0.5 |
| Which two numbers solve the puzzle?<image> | 4 <AND> 9 | 3 and 8 | 0.0 |
| What colour is the umbrella?<image> | red <OR> crimson | It is a crimson umbrella. | 1.0 |
| What colour is the umbrella?<image> | red <OR> crimson | The umbrella is blue. | 0.0 |
| Which picture comes next in the sequence?<image><image><image> | the third <OR> C | C | 1.0 |
| Why is this picture funny?<image> | A cat sleeps in a cardboard box labelled "security system" by the front \
door: the joke is that the household's security is a pet that is not paying attention. | A cat is lying in a box \
near a door. | 0.3 |
| Why is this picture funny?<image> | A cat sleeps in a cardboard box labelled "security system" by the front \
door: the joke is that the household's security is a pet that is not paying attention. | The box says "security \
system" but the guard is a cat fast asleep, so the house is "protected" by someone who is not watching at all. | 1.0 |
"""

RETRY_SUFFIX_V1 = "\nReply with the correctness score only, as a number: "
RETRY_SUFFIX_V2 = "\n\nReply with the correctness score only, as a number: "

_IMAGE_SUFFIXES = (".jpg", "jpeg", ".png")  # as the official v2 evaluator tests them


# ----------------------------------------------------------------------------------------------------- data loading
@dataclass(frozen=True)
class MMVetSample:
    """One benchmark question: ground truth (may contain ``<AND>``/``<OR>``) and its capability tags."""

    id: str
    question: str
    answer: str
    capabilities: tuple[str, ...]
    image: str | None = None


def _capabilities(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [c.strip() for c in value.split(",") if c.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise UserError(f"{where}: 'capability' must be a non-empty list of capability names")
    return tuple(dict.fromkeys(value))  # de-duplicate, keep order (the official code uses a set)


def load_metadata(path: str | Path) -> dict[str, MMVetSample]:
    """Read MM-Vet metadata: the official ``{id: {question, answer, capability, imagename}}`` JSON (v1 or v2), or a
    list/JSONL of records with ``question_id``/``id`` (capability as a list or a comma-separated string)."""
    data, _ = read_json_or_jsonl(path)
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        items = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict) or ("question_id" not in rec and "id" not in rec):
                raise UserError(f"{path}: record {i} has no 'question_id' or 'id'")
            items.append((str(rec.get("question_id", rec.get("id"))), rec))
    else:
        raise UserError(f"{path}: expected a JSON object {{id: {{question, answer, capability}}}} or a list of records")
    out: dict[str, MMVetSample] = {}
    for sid, rec in items:
        where = f"{path}: sample {shown(sid)}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object with question, answer and capability")
        for k in ("question", "answer"):
            if not isinstance(rec.get(k), str):
                raise UserError(f"{where}: missing or non-text {shown(k)}")
        if "capability" not in rec:
            raise UserError(f"{where}: missing 'capability'")
        if sid in out:
            raise UserError(f"{where}: duplicate id")
        image = rec.get("imagename", rec.get("image"))
        out[sid] = MMVetSample(sid, rec["question"], rec["answer"], _capabilities(rec["capability"], where),
                               image if isinstance(image, str) else None)
    if not out:
        raise UserError(f"{path}: no samples")
    return out


_PRED_ID_KEYS = ("question_id", "id")
_PRED_TEXT_KEYS = ("text", "answer", "prediction", "response")


def load_predictions(path: str | Path) -> dict[str, str]:
    """Read predictions: the official ``{id: answer}`` JSON, or a list/JSONL of ``{"question_id", "text"}`` records
    (LLaVA's answer files). Two different answers for one id are an error."""
    data, _ = read_json_or_jsonl(path)
    if isinstance(data, dict) and not any(k in data for k in _PRED_ID_KEYS):
        out: dict[str, str] = {}
        for k, v in data.items():
            if not isinstance(v, str):
                raise UserError(f"{path}: prediction for {shown(k)} is not text")
            out[str(k)] = v
        return out
    records = [data] if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise UserError(f"{path}: expected {{id: answer}} or records with question_id and text")
    out = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i + 1} is not an object")
        sid = next((rec[k] for k in _PRED_ID_KEYS if k in rec), None)
        text = next((rec[k] for k in _PRED_TEXT_KEYS if k in rec), None)
        if sid is None or not isinstance(text, str):
            raise UserError(f"{path}: record {i + 1} needs 'question_id' and a text field ('text')")
        sid = str(sid)
        if sid in out and out[sid] != text:
            raise UserError(f"{path}: two different predictions for id {shown(sid)}")
        out[sid] = text
    return out


def detect_version(samples: Mapping[str, MMVetSample]) -> str:
    """``"v2"`` when questions interleave images with ``<IMG>`` (MM-Vet v2), else ``"v1"``."""
    return "v2" if any("<IMG>" in s.question for s in samples.values()) else "v1"


# ----------------------------------------------------------------------------------------------------------- prompt
def _spaced_ground_truth(answer: str) -> str:
    return answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")


def v2_question_text(question: str) -> str:
    """v2: each ``<IMG>``-delimited segment that names an image file becomes ``<image>``."""
    return "".join("<image>" if part.endswith(_IMAGE_SUFFIXES) else part for part in question.split("<IMG>"))


def build_prompt(sample: MMVetSample, prediction: str, version: str, preamble: str | None = None) -> str:
    """The judge prompt for one sample: preamble, then the sample's table row with an empty Correctness cell."""
    if version == "v1":
        pre = PREAMBLE_V1 if preamble is None else preamble
        return pre + "\n" + " | ".join([sample.question, _spaced_ground_truth(sample.answer), prediction, ""])
    if version == "v2":
        pre = PREAMBLE_V2 if preamble is None else preamble
        row = [
            v2_question_text(sample.question).replace("\n", "<br>"),
            _spaced_ground_truth(sample.answer).replace("\n", "<br>"),
            prediction.replace("\n", "<br>"),
            "",
        ]
        return pre + "| " + " | ".join(row)
    raise ValueError(f"unknown MM-Vet version {shown(version)}")


def parse_score(content: str | None) -> float | None:
    """Official rule: the reply's first space-separated token must be a number in [0, 1]; otherwise None."""
    token = (content or "").split(" ")[0].strip()
    try:
        score = float(token)
    except ValueError:
        return None
    if not math.isfinite(score) or score < 0.0 or score > 1.0:
        return None
    return score


# ------------------------------------------------------------------------------------------------------ aggregation
def capability_order(capabilities: Mapping[str, Sequence[str]]) -> list[str]:
    """Capabilities by number of samples, most common first (ties: first seen), as the official table columns."""
    counter: Counter[str] = Counter()
    for caps in capabilities.values():
        counter.update(list(dict.fromkeys(caps)))
    return [c for c, _ in counter.most_common()]


def aggregate(
    capabilities: Mapping[str, Sequence[str]], scores: Mapping[str, Sequence[float]], num_runs: int
) -> dict[str, Any]:
    """Official MM-Vet aggregation over judged scores in [0, 1] (``scores[id][run]``), all in percent.

    Per run r: ``cap[c][r] = 100 * mean(score[id][r] for ids having c)``, ``total[r] = 100 * mean over all ids``;
    reported ``cap[c] = mean_r cap[c][r]``, ``std = population std of total[r]``; ``integrations`` is the same per
    exact capability combination (named by joining its capabilities in column order with ``_``).
    """
    ids = list(capabilities)
    if not ids:
        raise ValueError("no samples to aggregate")
    missing = [i for i in ids if i not in scores or len(scores[i]) < num_runs]
    if missing:
        raise ValueError(f"{len(missing)} sample(s) lack a score for every run, e.g. {missing[:3]}")
    order = capability_order(capabilities)
    rank = {c: k for k, c in enumerate(order)}
    combos: dict[str, int] = {}
    combo_of: dict[str, str] = {}
    for i in ids:
        name = "_".join(sorted(dict.fromkeys(capabilities[i]), key=rank.__getitem__))
        combo_of[i] = name
        combos[name] = combos.get(name, 0) + 1
    combo_order = sorted(combos, key=lambda n: -combos[n])  # stable: ties keep first-seen order

    def per_run(groups: Mapping[str, list[str]]) -> dict[str, list[float]]:
        return {g: [100.0 * sum(float(scores[i][r]) for i in members) / len(members) for r in range(num_runs)]
                for g, members in groups.items()}

    cap_members = {c: [i for i in ids if c in capabilities[i]] for c in order}
    combo_members = {n: [i for i in ids if combo_of[i] == n] for n in combo_order}
    cap_runs = per_run(cap_members)
    combo_runs = per_run(combo_members)
    totals = per_run({"total": ids})["total"]
    mean = sum(totals) / num_runs
    std = math.sqrt(sum((t - mean) ** 2 for t in totals) / num_runs)
    return {
        "capabilities": {c: sum(v) / num_runs for c, v in cap_runs.items()},
        "capability_counts": {c: len(m) for c, m in cap_members.items()},
        "integrations": {n: sum(v) / num_runs for n, v in combo_runs.items()},
        "integration_counts": {n: len(m) for n, m in combo_members.items()},
        "total": mean,
        "std": std,
        "runs": totals,
        "per_run": {"capabilities": cap_runs, "integrations": combo_runs},
        "num_samples": len(ids),
        "num_runs": num_runs,
    }


# ---------------------------------------------------------------------------------------------------------- grading
@dataclass
class GradeOptions:
    """How one sample is graded (defaults = the official procedure)."""

    version: str = "v1"
    temperature: float = 0.0
    max_tokens: int = 3
    parse_retries: int = 4
    retry_temperature_step: float = 0.5
    preamble: str | None = None
    retry_suffix: str | None = None

    def temperatures(self) -> list[float]:
        """First ask at T0; the k-th parse retry at T0 + step*(k-1), capped at 2.0 (the API maximum)."""
        t0 = self.temperature
        return [t0] + [min(2.0, t0 + self.retry_temperature_step * k) for k in range(self.parse_retries)]

    def suffix(self) -> str:
        if self.retry_suffix is not None:
            return self.retry_suffix
        return RETRY_SUFFIX_V2 if self.version == "v2" else RETRY_SUFFIX_V1


@dataclass
class Judgement:
    """Outcome of grading one sample in one run. ``status``: ok | unparseable | error | pending."""

    id: str
    run: int
    status: str = "pending"
    score: float | None = None
    replies: list[str] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    response_model: str | None = None
    from_cache: bool = True
    error: str | None = None
    rejected: bool = False  # the judge refused this request (HTTP 4xx other than auth/rate limit); never retried

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run, "status": self.status, "score": self.score, "replies": self.replies,
            "temperatures": self.temperatures, "response_model": self.response_model,
            "from_cache": self.from_cache if self.replies else None, "error": self.error,
            "rejected": self.rejected,
        }


def grade(judge: Any, sample: MMVetSample, prediction: str, run: int, opts: GradeOptions) -> Judgement:
    """Grade one sample once (official retry schedule). API errors propagate; see :func:`judge_all`."""
    from .judge import JudgeAPIError, JudgeStopped

    j = Judgement(sample.id, run)
    base = build_prompt(sample, prediction, opts.version, opts.preamble)
    for attempt, temp in enumerate(opts.temperatures()):
        prompt = base if attempt == 0 else base + opts.suffix()
        try:
            comp, cached = judge.ask(prompt, prediction=prediction, temperature=temp, run=run,
                                     max_tokens=opts.max_tokens, meta={"id": sample.id, "attempt": attempt})
        except JudgeStopped:
            j.status = "pending"
            return j
        except JudgeAPIError as e:
            j.status, j.error = "error", str(e)
            j.rejected = e.status is not None and not e.retryable and not e.fatal
            return j
        j.replies.append(comp.content)
        j.temperatures.append(temp)
        j.response_model = comp.model
        j.from_cache = j.from_cache and cached
        score = parse_score(comp.content)
        if score is not None:
            j.status, j.score = "ok", score
            return j
    j.status = "unparseable"
    j.error = f"no score in {len(j.replies)} judge replies"
    return j


def judge_all(
    judge: Any,
    samples: Mapping[str, MMVetSample],
    predictions: Mapping[str, str],
    runs: int,
    opts: GradeOptions,
    *,
    concurrency: int = 4,
    max_failures: int = 10,
    progress: Callable[[Judgement], None] | None = None,
) -> dict[tuple[str, int], Judgement]:
    """Grade every (sample, run) with bounded concurrency, run-major like the official loop.

    Stops early (pending judgements stay pending) when more than ``max_failures`` judgements failed, on a fatal API
    error, on the cost cap, or on Ctrl-C; everything answered before is already in the cache.
    """
    tasks = [(sid, r) for r in range(runs) for sid in samples]
    results: dict[tuple[str, int], Judgement] = {t: Judgement(t[0], t[1]) for t in tasks}
    failures = [0]
    lock = threading.Lock()
    stop: threading.Event = judge.stop

    def work(sid: str, run: int) -> Judgement:
        try:
            j = grade(judge, samples[sid], predictions[sid], run, opts)
        except BaseException as e:  # e.g. the cache cannot be written: stop before this worker's next task
            judge.request_stop("error", repr(e))
            raise
        if j.status in ("error", "unparseable"):  # counted in the worker so the stop precedes its next task
            with lock:
                failures[0] += 1
                if failures[0] > max_failures:
                    judge.request_stop("failures", f"{failures[0]} judgements failed (more than --max-failures "
                                                   f"{max_failures}); last: {j.id} run {j.run}: {j.error}")
        return j

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="judge")
    pending: dict[Future[Judgement], tuple[str, int]] = {}
    it = iter(tasks)
    try:
        while True:
            while not stop.is_set() and len(pending) < 2 * max(1, concurrency):
                t = next(it, None)
                if t is None:
                    break
                pending[pool.submit(work, t[0], t[1])] = t
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                t = pending.pop(fut)
                j = fut.result()
                results[t] = j
                if progress is not None:
                    progress(j)
    except BaseException as e:  # Ctrl-C or a bug: stop the workers instead of draining the queue
        judge.request_stop("interrupted" if isinstance(e, KeyboardInterrupt) else "error", repr(e))
        raise
    finally:
        stop_now = stop.is_set()
        pool.shutdown(wait=True, cancel_futures=stop_now)
        for fut, t in pending.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                results[t] = fut.result()
    return results


def scores_from_judgements(
    judgements: Mapping[tuple[str, int], Judgement], ids: Sequence[str], runs: int, unparseable: str = "zero",
    rejected: str = "failure",
) -> tuple[dict[str, list[float]] | None, dict[str, int]]:
    """Per-sample score lists for :func:`aggregate`, or None when any judgement is missing.

    ``unparseable="zero"`` counts an unparseable reply as 0.0 (official); ``"failure"`` treats it as missing.
    ``rejected="zero"`` counts a request the judge rejected (HTTP 4xx) as 0.0 (official v2); ``"failure"`` as missing.
    """
    counts = Counter(j.status for j in judgements.values())
    out: dict[str, list[float]] = {}
    for sid in ids:
        row = []
        for r in range(runs):
            j = judgements[(sid, r)]
            if j.status == "ok":
                row.append(float(j.score))  # type: ignore[arg-type]
            elif j.status == "unparseable" and unparseable == "zero":
                row.append(0.0)
            elif j.status == "error" and j.rejected and rejected == "zero":
                row.append(0.0)
            else:
                return None, dict(counts)
        out[sid] = row
    return out, dict(counts)
