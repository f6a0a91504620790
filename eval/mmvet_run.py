"""Running a judged MM-Vet evaluation end to end: inputs, judge set-up, progress, outputs, manifest.

Kept apart from :mod:`mmerase.eval.mmvet` (the benchmark's procedure and arithmetic), which it uses, so that module
stays pure and small.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunStopped, UserError
from .io import (
    OutDirLock,
    atomic_write_text,
    check_out_dir,
    ensure_out_dir,
    read_json,
    read_text,
    shown,
    shown_some,
    write_json,
    write_jsonl,
)
from .mmvet import (
    GradeOptions,
    Judgement,
    MMVetSample,
    aggregate,
    build_prompt,
    detect_version,
    judge_all,
    load_metadata,
    load_predictions,
    scores_from_judgements,
)
from .report import fmt, manifest, markdown_table

MAX_LISTED_FAILURES = 100
OUTPUT_NAMES = ("mmvet_judgements.jsonl", "mmvet_summary.json", "mmvet_summary.md", "mmvet_manifest.json", ".lock")


@dataclass
class MMVetRun:
    """Everything a judged MM-Vet run needs (the CLI fills this from flags/config)."""

    metadata: Path
    predictions: Path
    out: Path
    judge_model: str
    base_url: str | None = None
    runs: int = 1
    version: str = "auto"
    grade: GradeOptions = field(default_factory=GradeOptions)
    unparseable: str = "zero"
    rejected: str = "failure"
    concurrency: int = 4
    max_failures: int = 10
    max_cost: float | None = None
    timeout: float = 60.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    api_key_env: str = "OPENAI_API_KEY"
    azure: bool = False
    api_version: str | None = None
    price_table: Path | None = None
    price_in: float | None = None
    price_out: float | None = None
    cache: Path | None = None
    subset: Path | None = None
    prompt_file: Path | None = None
    official_evaluator: Path | None = None
    model_name: str | None = None
    decimal_places: int = 1
    progress: bool = False
    argv: Sequence[str] | None = None


@dataclass
class Inputs:
    """The samples to judge (after ``--subset``), their predictions, and how they are graded."""

    samples: dict[str, MMVetSample]
    predictions: dict[str, str]
    ignored_predictions: int
    version: str
    grade: GradeOptions
    prompt_label: str


@dataclass
class Judged:
    """What judging produced: the judgements and the judge, cache, cost meter and price behind them."""

    judgements: dict[tuple[str, int], Judgement]
    judge: Any
    cache: Any
    meter: Any
    price: Any


def _load_subset(path: Path, samples: dict[str, Any]) -> list[str]:
    data = read_json(path)
    if isinstance(data, dict):
        data = list(data)
    if not isinstance(data, list):
        raise UserError(f"{path}: subset must be a JSON list of sample ids")
    ids = [str(x) for x in data]
    unknown = [i for i in ids if i not in samples]
    if unknown:
        raise UserError(f"{path}: {len(unknown)} id(s) not in the metadata, e.g. {shown_some(unknown)}")
    return list(dict.fromkeys(ids))


def _price(cfg: MMVetRun):  # -> Price | None
    from .pricing import Price, lookup_price, parse_price_table

    if (cfg.price_in is None) != (cfg.price_out is None):
        raise UserError("--price-in and --price-out must be given together (USD per 1M tokens)")
    if cfg.price_in is not None:
        if cfg.price_in < 0 or cfg.price_out < 0:  # type: ignore[operator]
            raise UserError("--price-in/--price-out must be non-negative")
        return Price(cfg.price_in, cfg.price_out, "--price-in/--price-out")  # type: ignore[arg-type]
    table = None
    if cfg.price_table is not None:
        from .cli_config import load_mapping_file

        table = parse_price_table(load_mapping_file(cfg.price_table), str(cfg.price_table))
    return lookup_price(cfg.judge_model, table)


def _usage_totals(records: list[dict[str, Any]], runs: int, price: Any) -> dict[str, Any]:
    """Tokens and cost (at the current price) of every judge reply the scores rest on, cached or new, in total and
    per run index."""
    by_run: dict[int, dict[str, Any]] = defaultdict(lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                             "cost_usd": 0.0})
    for rec in records:
        b = by_run[int(rec.get("run", 0))]
        pt, ct = int(rec.get("prompt_tokens") or 0), int(rec.get("completion_tokens") or 0)
        b["requests"] += 1
        b["prompt_tokens"] += pt
        b["completion_tokens"] += ct
        b["cost_usd"] += price.cost(pt, ct) if price is not None else 0.0
    rows = [{"run": r, **by_run[r]} for r in range(runs)]
    if price is None:
        for r in rows:
            r["cost_usd"] = None
    return {
        "requests": sum(r["requests"] for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "cost_usd": None if price is None else sum(r["cost_usd"] for r in rows),
        "by_run": rows,
    }


def _grading(cfg: MMVetRun, samples: dict[str, Any]) -> tuple[str, GradeOptions, str]:
    """``(version, grading options, what prompt is used)`` from the built-in prompt, ``--prompt-file`` or
    ``--official-evaluator``."""
    if cfg.version not in ("auto", "v1", "v2"):
        raise UserError(f"--mmvet-version must be auto, v1 or v2, not {shown(cfg.version)}")
    if cfg.official_evaluator is not None:
        from .mmvet_official import read_official_evaluator

        if cfg.prompt_file is not None or cfg.grade.retry_suffix is not None:
            raise UserError("--official-evaluator supplies the prompt and retry wording: drop --prompt-file and "
                            "--retry-suffix")
        off = read_official_evaluator(cfg.official_evaluator)
        if cfg.version not in ("auto", off.version):
            raise UserError(f"{off.path} lays prompts out as MM-Vet {off.version}, but --mmvet-version is "
                            f"{cfg.version}")
        if cfg.version == "auto" and detect_version(samples) != off.version:
            warnings.warn(f"{off.path} lays prompts out as MM-Vet {off.version} while the metadata looks like "
                          f"{detect_version(samples)}; the script's layout is used")
        opts = GradeOptions(**{**cfg.grade.__dict__, "version": off.version, "preamble": off.preamble,
                               "retry_suffix": off.retry_suffix})
        return off.version, opts, f"official evaluator {Path(off.path).name} ({off.version} layout)"
    version = detect_version(samples) if cfg.version == "auto" else cfg.version
    preamble = None
    if cfg.prompt_file is not None:
        preamble = read_text(cfg.prompt_file)
    opts = GradeOptions(**{**cfg.grade.__dict__, "version": version, "preamble": preamble})
    return version, opts, "custom (--prompt-file)" if preamble is not None else f"built-in {version}"


def run_mmvet(cfg: MMVetRun) -> dict[str, Any]:
    """Judge, aggregate and write ``mmvet_judgements.jsonl``, ``mmvet_summary.{json,md}``, ``mmvet_manifest.json``.

    Returns the summary. Raises :class:`RunStopped` (after writing everything) when the run did not finish with a
    score for every judgement, :class:`UserError` for bad inputs.
    """
    from .judge import Redactor
    from .pricing import CostMeter

    started = time.time()
    check_out_dir(cfg.out)
    check_options(cfg)
    check_cache_path(cfg)
    inputs = load_inputs(cfg)
    api_key = judge_api_key(cfg)
    redact = Redactor(api_key)
    price = _price(cfg)
    meter = CostMeter(price, cfg.max_cost)
    out = ensure_out_dir(cfg.out)
    with OutDirLock(out):
        judged = judge_inputs(cfg, inputs, out, api_key, redact, meter, price)
        summary = build_summary(cfg, inputs, judged, redact)
        write_outputs(cfg, inputs, judged, summary, out, started, redact)
    if summary["scores"] is None:
        raise stopped(cfg, summary, judged, out, redact)
    return summary


def check_options(cfg: MMVetRun) -> None:
    """Refuse option values no run can use, before anything is read or asked."""
    if cfg.runs < 1:
        raise UserError("--runs must be at least 1")
    if cfg.concurrency < 1:
        raise UserError("--concurrency must be at least 1")
    if cfg.max_failures < 0:
        raise UserError("--max-failures must be >= 0")
    g = cfg.grade
    if g.max_tokens < 1 or g.parse_retries < 0 or cfg.max_retries < 0 or cfg.timeout <= 0:
        raise UserError("--max-tokens must be >= 1, --parse-retries and --max-retries >= 0, --timeout > 0")
    if not 0.0 <= g.temperature <= 2.0:
        raise UserError("--temperature must be within [0, 2]")
    for name, value in (("unparseable", cfg.unparseable), ("rejected", cfg.rejected)):
        if value not in ("zero", "failure"):
            raise UserError(f"--{name} must be 'zero' or 'failure', not {shown(value)}")


def cache_path(cfg: MMVetRun) -> Path:
    """The judge cache file: ``--cache`` or ``<out>/judge_cache.jsonl``."""
    return Path(cfg.cache) if cfg.cache is not None else Path(cfg.out) / "judge_cache.jsonl"


def check_cache_path(cfg: MMVetRun) -> None:
    """Refuse, before anything is read, written or asked, a cache path that is one of the run's input or output
    files, or an existing file that is not an mmerase judge cache (:func:`~mmerase.eval.judge.check_cache_file`):
    mmerase writes to no file it did not create."""
    from .judge import check_cache_file

    path = cache_path(cfg)
    where = path.resolve()
    inputs = {"--metadata": cfg.metadata, "--predictions": cfg.predictions, "--subset": cfg.subset,
              "--prompt-file": cfg.prompt_file, "--official-evaluator": cfg.official_evaluator,
              "--price-table": cfg.price_table}
    for flag, p in inputs.items():
        if p is not None and Path(p).resolve() == where:
            raise UserError(f"{path}: --cache is the {flag} file; give the judge cache a file of its own "
                            "(left untouched)")
    for name in OUTPUT_NAMES:
        if (Path(cfg.out) / name).resolve() == where:
            raise UserError(f"{path}: --cache is the run's output {name}; give the judge cache another name")
    check_cache_file(path)


def load_inputs(cfg: MMVetRun) -> Inputs:
    """The metadata (cut to ``--subset``), a prediction for each sample (a missing one is an error), and the
    grading options and prompt."""
    samples = load_metadata(cfg.metadata)
    predictions = load_predictions(cfg.predictions)
    if cfg.subset is not None:
        keep = _load_subset(cfg.subset, samples)
        samples = {i: samples[i] for i in keep}
    missing = [i for i in samples if i not in predictions]
    if missing:
        raise UserError(f"{cfg.predictions}: no prediction for {len(missing)} of {len(samples)} samples "
                        f"(e.g. {shown_some(missing, 5)}); use --subset to judge only some ids")
    extra = sum(1 for i in predictions if i not in samples)
    version, grade, prompt_label = _grading(cfg, samples)
    return Inputs(samples, predictions, extra, version, grade, prompt_label)


def judge_api_key(cfg: MMVetRun) -> str:
    """The judge's API key from the environment variable ``cfg.api_key_env``."""
    api_key = os.environ.get(cfg.api_key_env)
    if not api_key:
        raise UserError(f"environment variable {cfg.api_key_env} is not set (the judge's API key; "
                        "any non-empty value for a local server)")
    return api_key


def judge_inputs(cfg: MMVetRun, inputs: Inputs, out: Path, api_key: str, redact: Any, meter: Any, price: Any
                 ) -> Judged:
    """Judge every (sample, run) through the cache in ``out`` (or ``--cache``), with a progress bar."""
    from .judge import Judge, JudgeCache, OpenAIBackend, RetryPolicy

    cache = JudgeCache(cache_path(cfg))
    try:
        backend = OpenAIBackend(cfg.judge_model, api_key=api_key, base_url=cfg.base_url, azure=cfg.azure,
                                api_version=cfg.api_version, timeout=cfg.timeout, redact=redact)
        judge = Judge(backend, cache, model=cfg.judge_model,
                      retry=RetryPolicy(cfg.max_retries, cfg.backoff_base, cfg.backoff_max),
                      meter=meter, stop=threading.Event())
        judgements = judge_with_progress(cfg, inputs, judge, meter)
    finally:
        cache.close()
    return Judged(judgements, judge, cache, meter, price)


def judge_with_progress(cfg: MMVetRun, inputs: Inputs, judge: Any, meter: Any) -> dict[tuple[str, int], Judgement]:
    """:func:`~mmerase.eval.mmvet.judge_all` with a progress bar on stderr (cost, new, cached and failed counts)."""
    from tqdm import tqdm

    bar = tqdm(total=len(inputs.samples) * cfg.runs, desc=f"judging ({cfg.judge_model})", unit="judgement",
               disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    failed = [0]

    def progress(j: Judgement) -> None:
        if j.status in ("error", "unparseable"):
            failed[0] += 1
        bar.update(1)
        bar.set_postfix(cost=f"${meter.spent:.4f}", new=judge.stats.requests, cached=judge.stats.cache_hits,
                        failed=failed[0], refresh=False)

    try:
        return judge_all(judge, inputs.samples, inputs.predictions, cfg.runs, inputs.grade,
                         concurrency=cfg.concurrency, max_failures=cfg.max_failures, progress=progress)
    finally:
        bar.close()


def replies_used(cfg: MMVetRun, inputs: Inputs, judged: Judged) -> list[dict[str, Any]]:
    """Every cached judge reply the scores rest on (each attempt of each judgement), for the usage and cost."""
    from .judge import cache_key

    used: list[dict[str, Any]] = []
    g = inputs.grade
    for (sid, r), j in judged.judgements.items():
        prediction = inputs.predictions[sid]
        base = build_prompt(inputs.samples[sid], prediction, inputs.version, g.preamble)
        for attempt, temp in enumerate(j.temperatures):
            prompt = base if attempt == 0 else base + g.suffix()
            rec = judged.cache.get(cache_key(cfg.judge_model, prompt, prediction, temp, r, g.max_tokens))
            if rec is not None:
                used.append(rec)
    return used


def judgement_counts(cfg: MMVetRun, judgements: dict[tuple[str, int], Judgement], ids: list[str]
                     ) -> tuple[dict[str, list[float]] | None, dict[str, int]]:
    """Per-sample scores (None if any is missing) and the number of judgements per status, rejections included."""
    scores, counts = scores_from_judgements(judgements, ids, cfg.runs, cfg.unparseable, cfg.rejected)
    for k in ("ok", "unparseable", "error", "pending"):
        counts.setdefault(k, 0)
    counts["rejected"] = sum(1 for j in judgements.values() if j.status == "error" and j.rejected)
    return scores, counts


def build_summary(cfg: MMVetRun, inputs: Inputs, judged: Judged, redact: Any) -> dict[str, Any]:
    """The run's summary: status, scores (None when incomplete), judgement counts, failures, judge and usage."""
    ids = list(inputs.samples)
    judgements, judge, g = judged.judgements, judged.judge, inputs.grade
    scores, counts = judgement_counts(cfg, judgements, ids)
    agg = aggregate({i: inputs.samples[i].capabilities for i in ids}, scores, cfg.runs) if scores is not None else None
    # a stop that came after the last judgement was answered does not make the result incomplete
    reason = None if agg is not None else (judge.stop_reason or "incomplete")
    failures = [{"id": j.id, "run": j.run, "status": j.status, "rejected": j.rejected, "error": j.error,
                 "replies": j.replies} for j in judgements.values() if j.status in ("error", "unparseable")]
    return {
        "benchmark": "mm-vet" if inputs.version == "v1" else "mm-vet-v2",
        "model": cfg.model_name or Path(cfg.predictions).stem,
        "status": "complete" if reason is None else f"stopped: {reason}",
        "complete": agg is not None,
        "stop_message": redact(judge.stop_message) if judge.stop_message else None,
        "num_samples": len(ids),
        "num_runs": cfg.runs,
        "judgements": {"total": len(judgements), **counts},
        "unparseable_policy": cfg.unparseable,
        "rejected_policy": cfg.rejected,
        "scores": agg,
        "failures": failures[:MAX_LISTED_FAILURES],
        "failures_listed": min(len(failures), MAX_LISTED_FAILURES),
        "ignored_predictions": inputs.ignored_predictions,
        "judge": {"model": cfg.judge_model, "server_models": sorted(judge.stats.server_models),
                  "temperature": g.temperature, "max_tokens": g.max_tokens, "parse_retries": g.parse_retries,
                  "prompt": inputs.prompt_label},
        "usage": usage(cfg, inputs, judged),
        "cache": {"path": str(judged.cache.path), "records": len(judged.cache),
                  "unreadable_lines": judged.cache.bad_lines},
    }


def usage(cfg: MMVetRun, inputs: Inputs, judged: Judged) -> dict[str, Any]:
    """Requests, tokens and cost of this invocation, and of every judge reply behind the scores."""
    judge, meter, price = judged.judge, judged.meter, judged.price
    return {
        "this_invocation": {
            "requests": judge.stats.requests,
            "cache_hits": judge.stats.cache_hits,
            "retries": judge.stats.retries,
            "prompt_tokens": meter.prompt_tokens,
            "completion_tokens": meter.completion_tokens,
            "cost_usd": meter.spent if price else None,
            "usage_estimated": meter.estimated_usage,
        },
        "all_judgements": _usage_totals(replies_used(cfg, inputs, judged), cfg.runs, price),
        "price": price.source if price else None,
        "max_cost": cfg.max_cost,
    }


def judgement_rows(cfg: MMVetRun, inputs: Inputs, judgements: dict[tuple[str, int], Judgement]
                   ) -> list[dict[str, Any]]:
    """One row per sample for ``mmvet_judgements.jsonl``: the sample, its prediction and each run's judgement."""
    rows = []
    for sid, sample in inputs.samples.items():
        js = [judgements[(sid, r)] for r in range(cfg.runs)]
        rows.append({
            "id": sid, "capability": list(sample.capabilities), "question": sample.question,
            "answer": sample.answer, "prediction": inputs.predictions[sid],
            "scores": [j.score for j in js], "judgements": [j.to_dict() for j in js],
        })
    return rows


def write_outputs(cfg: MMVetRun, inputs: Inputs, judged: Judged, summary: dict[str, Any], out: Path,
                  started: float, redact: Any) -> None:
    """Write the judgements, the summary (JSON and Markdown) and the manifest, each atomically."""
    write_jsonl(out / "mmvet_judgements.jsonl", judgement_rows(cfg, inputs, judged.judgements))
    write_json(out / "mmvet_summary.json", summary)
    atomic_write_text(out / "mmvet_summary.md", redact(render_markdown(summary, cfg.decimal_places)))
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()
               if k not in ("grade", "argv")}
    options["base_url"] = redact(cfg.base_url) if cfg.base_url else None
    options["grade"] = {k: v for k, v in inputs.grade.__dict__.items() if k != "preamble"}
    options["version"] = inputs.version
    write_json(out / "mmvet_manifest.json", manifest(
        "mmvet", {"metadata": cfg.metadata, "predictions": cfg.predictions, "prompt_file": cfg.prompt_file,
                  "official_evaluator": cfg.official_evaluator,
                  "subset": cfg.subset, "price_table": cfg.price_table},
        options, started, argv=[redact(a) for a in cfg.argv] if cfg.argv is not None else None,
        judge={"model": cfg.judge_model, "server_models": sorted(judged.judge.stats.server_models),
               "api_key_env": cfg.api_key_env},
    ))


def stopped(cfg: MMVetRun, summary: dict[str, Any], judged: Judged, out: Path, redact: Any) -> RunStopped:
    """The error of a run without a score: what is missing, and that a rerun resumes from the cache."""
    reason = judged.judge.stop_reason or "incomplete"
    if reason == "incomplete":
        counts = summary["judgements"]
        unscored = counts["error"] + counts["pending"]
        if cfg.rejected == "zero":
            unscored -= counts["rejected"]
        if cfg.unparseable == "failure":
            unscored += counts["unparseable"]
        msg = (f"{unscored} judgement(s) without a score (see {out / 'mmvet_judgements.jsonl'}); "
               "rerun the same command to retry them (answered ones are cached)")
    else:
        msg = (f"{redact(judged.judge.stop_message or reason)}; judged so far is kept in {judged.cache.path}, "
               "rerun the same command to resume")
    return RunStopped(msg, reason)


def render_markdown(summary: dict[str, Any], places: int = 1) -> str:
    """The human-readable report: capability table, capability-integration table, judgement counts and cost."""
    lines = [f"# {summary['benchmark']} — {summary['model']}", ""]
    c = summary["judgements"]
    lines.append(f"Status: **{summary['status']}** · judge `{summary['judge']['model']}` "
                 f"(server reported: {', '.join(summary['judge']['server_models']) or 'n/a'}) · "
                 f"{summary['num_samples']} samples × {summary['num_runs']} run(s)")
    lines.append("")
    lines.append(f"Judgements: {c['ok']} scored, {c['unparseable']} unparseable, {c['error']} failed, "
                 f"{c['pending']} not judged.")
    if c["unparseable"]:
        how = ("counted as 0.0, as the official evaluator does" if summary["unparseable_policy"] == "zero"
               else "treated as failures")
        lines.append(f"Unparseable judge replies are {how} (ids in mmvet_summary.json 'failures').")
    if c["rejected"] and summary["rejected_policy"] == "zero":
        lines.append(f"{c['rejected']} request(s) rejected by the judge (HTTP 4xx) are counted as 0.0, as the "
                     "official v2 evaluator does (--rejected zero).")
    if summary["stop_message"]:
        lines.append(f"Stopped: {summary['stop_message']}")
    lines.append("")
    agg = summary["scores"]
    if agg is None:
        lines.append("**No score: the run is incomplete.** Rerun the same command to resume; nothing answered is "
                     "asked again.")
    else:
        caps = list(agg["capabilities"])
        runs = "[" + ", ".join(fmt(t, places) for t in agg["runs"]) + "]"
        lines.append("## Capabilities")
        lines.append("")
        lines.append(markdown_table(["model", *caps, "total", "std", "runs"],
                                    [[summary["model"], *agg["capabilities"].values(), agg["total"], agg["std"], runs]],
                                    places))
        lines.append("## Capability integrations")
        lines.append("")
        ints = list(agg["integrations"])
        lines.append(markdown_table(["model", *ints, "total", "std", "runs"],
                                    [[summary["model"], *agg["integrations"].values(), agg["total"], agg["std"], runs]],
                                    places))
        lines.append("Samples per capability: " + ", ".join(f"{k} {v}" for k, v in agg["capability_counts"].items())
                     + "; per integration: " + ", ".join(f"{k} {v}" for k, v in agg["integration_counts"].items()))
        lines.append("")
    u = summary["usage"]
    this, allj = u["this_invocation"], u["all_judgements"]
    cost_now = f"${this['cost_usd']:.4f}" if this["cost_usd"] is not None else "unknown (no price)"
    cost_all = f"${allj['cost_usd']:.4f}" if allj["cost_usd"] is not None else "unknown"
    lines.append("## Judge usage")
    lines.append("")
    lines.append(f"This invocation: {this['requests']} requests ({this['cache_hits']} answers from the cache, "
                 f"{this['retries']} retries), {this['prompt_tokens']} prompt + {this['completion_tokens']} completion "
                 f"tokens, {cost_now}. All judge replies behind these scores: {allj['requests']} requests, "
                 f"{allj['prompt_tokens'] + allj['completion_tokens']} tokens, {cost_all}"
                 + (f" (price: {u['price']})." if u["price"] else "."))
    lines.append("")
    return "\n".join(lines)
