"""File-level runners of the non-judged subcommands: read inputs, compute, write JSONL + JSON + Markdown + manifest.

(The judged MM-Vet run lives in :mod:`mmerase.eval.mmvet_run`.)
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import (
    OutDirLock,
    atomic_write_text,
    check_out_dir,
    ensure_out_dir,
    iter_jsonl,
    read_json_or_jsonl,
    shown,
    shown_some,
    write_json,
    write_jsonl,
)
from .report import manifest, markdown_table


# ----------------------------------------------------------------------------------------------------------- R-Bench
def expand_holder(paths: Sequence[Path]) -> list[Path]:
    """R-Bench's eval.sh names its five id files with a ``holder`` placeholder (``..._ids_holder.json``); such a name
    that does not exist itself stands for the files with ``holder`` replaced by 1..5."""
    out: list[Path] = []
    for p in map(Path, paths):
        if "holder" in p.name and not p.exists():
            found = [p.with_name(p.name.replace("holder", str(i))) for i in range(1, 6)]
            missing = [str(f) for f in found if not f.exists()]
            if missing:
                raise UserError(f"{p}: expected the five files {p.name.replace('holder', '1..5')}; missing "
                                f"{', '.join(missing)}")
            out.extend(found)
        else:
            out.append(p)
    return out


def run_rbench(
    questions: Path,
    predictions: Path,
    out: Path,
    subset_ids: Sequence[Path] = (),
    mode: str = "official",
    label_field: str = "label",
    decimal_places: int = 2,
    argv: Sequence[str] | None = None,
    eval_kind: str = "subsets",
) -> dict[str, Any]:
    """Score predictions and write ``rbench_*`` files into ``out``.

    ``eval_kind``: ``subsets`` = yes/no metrics per id subset and on average (R-Bench's image- and instance-level
    evaluation); ``web`` = yes/no metrics per question ``type`` and in total (its web-image mode); ``box`` = the
    boxed object's name in the answer (its box mode, :mod:`mmerase.eval.rbench_box`).
    """
    from . import rbench

    started = time.time()
    if mode not in rbench.MODES:
        raise UserError(f"--mode must be one of {', '.join(rbench.MODES)}, not {shown(mode)}")
    if eval_kind not in EVAL_KINDS:
        raise UserError(f"--eval must be one of {', '.join(EVAL_KINDS)}, not {shown(eval_kind)}")
    if eval_kind != "subsets" and subset_ids:
        raise UserError(f"--subset-ids is for --eval subsets; --eval {shown(eval_kind, quote=False)} takes no id files")
    check_out_dir(out)
    if eval_kind == "box":
        return _run_rbench_box(questions, predictions, out, decimal_places, argv, started)
    qs = rbench.load_questions(questions, label_field)
    records = rbench.load_answer_records(predictions)
    answers, dups = rbench.answers_by_id(records)
    subset_ids = expand_holder(subset_ids)
    subsets = rbench.type_subsets(qs, questions) if eval_kind == "web" else _id_subsets(subset_ids) or \
        {"all": list(qs)}
    result = rbench.evaluate(qs, answers, subsets, mode, label_field)
    if eval_kind == "web":  # the official script reports the 'total' row, not a mean over the types
        result["average"] = None
    result["eval"] = eval_kind
    result["duplicate_predictions"] = dups
    result["ignored_predictions"] = sum(1 for k in answers if k not in qs)
    converted = rbench.ids_matched_by_conversion(qs, [raw for raw, _ in records])
    result["ids_matched_by_conversion"] = len(converted)
    _warn_rbench(result, predictions, converted)
    out = ensure_out_dir(out)
    with OutDirLock(out):
        write_jsonl(out / "rbench_samples.jsonl", rbench.per_question_rows(qs, answers, subsets, label_field))
        write_json(out / "rbench_summary.json", result)
        atomic_write_text(out / "rbench_summary.md", render_rbench(result, decimal_places))
        write_json(out / "rbench_manifest.json", manifest(
            "rbench", {"questions": questions, "predictions": predictions,
                       **{f"subset:{Path(p).stem}": p for p in subset_ids}},
            {"eval": eval_kind, "mode": mode, "label_field": label_field, "decimal_places": decimal_places},
            started, argv=argv))
    return result


EVAL_KINDS = ("subsets", "web", "box")

_CONVERTED = ("{n} answer id(s) matched a question id only after conversion between number and text (such as "
              "\"7\" for 7); they are scored here, while R-Bench's script counts them as unanswered")


def _id_subsets(paths: Sequence[Path]) -> dict[str, list[str]]:
    from .rbench import load_subset_ids

    subsets: dict[str, list[str]] = {}
    for p in paths:
        name = Path(p).stem
        if name in subsets:
            raise UserError(f"{p}: two subset files share the name {shown(name)}")
        subsets[name] = load_subset_ids(p)
    return subsets


def _warn_rbench(result: dict[str, Any], predictions: Path, converted: Sequence[str]) -> None:
    if result["missing_total"]:
        warnings.warn(f"{result['missing_total']} question(s) have no prediction; they are listed per subset in "
                      "rbench_summary.json ('missing_ids') and not scored")
    if result["duplicate_predictions"]:
        warnings.warn(f"{predictions}: {result['duplicate_predictions']} duplicated question_id(s); the last answer "
                      "of each was used")
    if converted:
        warnings.warn(f"{predictions}: " + _CONVERTED.format(n=len(converted)))


def _run_rbench_box(questions: Path, predictions: Path, out: Path, places: int, argv: Sequence[str] | None,
                    started: float) -> dict[str, Any]:
    from .rbench_box import evaluate_box, load_box_answers, load_box_questions

    result = evaluate_box(load_box_questions(questions), load_box_answers(predictions), predictions)
    rows = result.pop("rows")
    if result["missing"]:
        warnings.warn(f"{result['missing']} question(s) have no answer; listed in rbench_summary.json "
                      "('missing_ids') and not scored")
    if result["ids_matched_by_conversion"]:
        warnings.warn(f"{predictions}: " + _CONVERTED.format(n=result["ids_matched_by_conversion"]))
    out = ensure_out_dir(out)
    with OutDirLock(out):
        write_jsonl(out / "rbench_samples.jsonl", rows)
        write_json(out / "rbench_summary.json", result)
        atomic_write_text(out / "rbench_summary.md", render_rbench_box(result, places))
        write_json(out / "rbench_manifest.json", manifest(
            "rbench", {"questions": questions, "predictions": predictions}, {"eval": "box", "decimal_places": places},
            started, argv=argv))
    return result


def render_rbench_box(result: dict[str, Any], places: int = 2) -> str:
    text = ["# R-Bench box evaluation (the boxed object's name in the answer)", "",
            f"Answers paired with questions by {result['pairing'].replace('_', ' ')}."]
    if result["missing"]:
        text.append(f"**{result['missing']} question(s) have no answer** (not scored; ids in rbench_summary.json).")
    if result["ids_matched_by_conversion"]:
        text.append(_CONVERTED.format(n=result["ids_matched_by_conversion"]) + ".")
    text.append("")
    text.append(markdown_table(["questions", "scored", "missing", "correct", "accuracy"],
                               [[result["questions"], result["scored"], result["missing"], result["correct"],
                                 result["accuracy"]]], places))
    return "\n".join(text)


def render_rbench(result: dict[str, Any], places: int = 2) -> str:
    from .rbench import METRICS

    rows = []
    for name, r in result["subsets"].items():
        m = r["metrics"]
        rows.append([name, r["questions"], r["scored"], r["missing"], r["unparseable"] if result["mode"] == "strict"
                     else "—", *[m[k] for k in METRICS]])
    if len(result["subsets"]) > 1 and result["average"] is not None:
        rows.append(["**average**", "", "", "", "", *[result["average"][k] for k in METRICS]])
    what = "R-Bench web-image evaluation per question type" if result.get("eval") == "web" else "Yes/no evaluation"
    text = [f"# {what} ({result['mode']} parsing)", ""]
    if result["missing_total"]:
        text.append(f"**{result['missing_total']} question(s) have no prediction** (not scored; ids in "
                    "rbench_summary.json).")
    if result["mode"] == "strict" and result["unparseable_total"]:
        text.append(f"{result['unparseable_total']} answer(s) are neither a clear yes nor a clear no (not scored).")
    if result.get("ids_matched_by_conversion"):
        text.append(_CONVERTED.format(n=result["ids_matched_by_conversion"]) + ".")
    text.append("")
    text.append(markdown_table(["subset", "questions", "scored", "missing", "unparseable", "accuracy", "precision",
                                "recall", "F1", "yes ratio"], rows, places))
    return "\n".join(text)


def run_rbench_draw(
    questions: Path,
    image_dir: Path,
    out: Path,
    kind: str = "box",
    mask_dir: Path | None = None,
    sub_color: str = "red",
    obj_color: str = "green",
    argv: Sequence[str] | None = None,
) -> int:
    """Write ``images/<question_id>.png`` with the drawn instances and ``questions_<kind>.jsonl`` with the rewritten
    question and image path, ready for a model's answer generation. Returns the number of questions."""
    from .rbench_draw import prepare_instance, safe_file_stem

    started = time.time()
    check_out_dir(out)
    data, _ = read_json_or_jsonl(questions)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{questions}: expected a JSON list (or JSON Lines) of questions")
    for i, rec in enumerate(data, start=1):
        missing = [k for k in ("question_id", "text", "image", "subject", "object") if not isinstance(rec, dict)
                   or k not in rec]
        if missing:
            raise UserError(f"{questions}: question {i} lacks {', '.join(missing)}")
    stems: set[str] = set()
    for i, rec in enumerate(data, start=1):
        try:
            stem = safe_file_stem(rec["question_id"])
        except UserError as e:
            raise UserError(f"{questions}: question {i}: {e}") from None
        if stem in stems:
            raise UserError(f"{questions}: question {i}: question_id {shown(stem)} given twice (each names an image)")
        stems.add(stem)
    out = ensure_out_dir(out)
    (out / "images").mkdir(exist_ok=True)
    rows = []
    with OutDirLock(out):
        for rec in data:
            img, text = prepare_instance(rec, image_dir, kind, mask_dir, sub_color, obj_color)
            rel = f"images/{safe_file_stem(rec['question_id'])}.png"
            img.save(out / rel)
            rows.append({**rec, "text": text, "image": rel, "original_text": rec["text"],
                         "original_image": rec["image"]})
        write_jsonl(out / f"questions_{kind}.jsonl", rows)
        write_json(out / "rbench_draw_manifest.json", manifest(
            "rbench-draw", {"questions": questions},
            {"kind": kind, "image_dir": str(image_dir), "mask_dir": str(mask_dir) if mask_dir else None,
             "sub_color": sub_color, "obj_color": obj_color}, started, argv=argv))
    return len(rows)


# -------------------------------------------------------------------------------------------------------- unlearning
def parse_named_files(items: Sequence[str], flag: str = "--records") -> dict[str, Path]:
    """``["name=path", ...]`` -> ordered ``{name: Path}``."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag} expects NAME=FILE, got {shown(item)}")
        if name in out:
            raise UserError(f"{flag}: name {shown(name)} given twice")
        out[name] = Path(path)
    return out


def run_unlearning(
    records: Sequence[str],
    out: Path,
    corrupted: str | None = None,
    retrained: str | None = None,
    mia_member_split: str = "forget",
    mia_nonmember_split: str = "test",
    decimal_places: int = 4,
    argv: Sequence[str] | None = None,
    computed: dict[str, list[dict[str, Any]]] | None = None,
    min_k: float = 0.2,
    computed_from: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Read per-adapter JSONL of per-sample results (or take ``computed`` records), compute
    :func:`mmerase.eval.unlearning.evaluate_unlearning`, write ``unlearning_summary.{json,md,png}`` (every metric in one
    table and one figure), ``unlearning_samples.jsonl`` and a manifest (``computed_from``: the files the computed
    records came from, for their sha256)."""
    from .unlearning import evaluate_unlearning, sample_scores
    from .unlearning_report import plot_summary, render_summary

    started = time.time()
    if computed is not None:
        files: dict[str, Path] = {}
        data = computed
    else:
        files = parse_named_files(records)
        if not files:
            raise UserError("--records: give at least one NAME=FILE")
        check_out_dir(out)
        data = {name: [obj for _, obj in iter_jsonl(path)] for name, path in files.items()}
    result = evaluate_unlearning(data, corrupted=corrupted, retrained=retrained, mia_member_split=mia_member_split,
                                 mia_nonmember_split=mia_nonmember_split, min_k=min_k)
    out = ensure_out_dir(out)
    with OutDirLock(out):
        rows = [{"adapter": name, "id": str(r.get("id")), "split": r.get("split"), **sample_scores(r, min_k)}
                for name, recs in data.items() for r in recs]
        write_jsonl(out / "unlearning_samples.jsonl", rows)
        if computed is not None:  # the records themselves, so that a later run can take them with --records
            for name, recs in data.items():
                write_jsonl(out / f"records_{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.jsonl", recs)
        write_json(out / "unlearning_summary.json", result)
        atomic_write_text(out / "unlearning_summary.md", render_summary(result, decimal_places))
        plot_summary(result, out / "unlearning_summary.png")
        write_json(out / "unlearning_manifest.json", manifest(
            "unlearning", {**{f"records:{k}": v for k, v in files.items()}, **(computed_from or {})},
            {"corrupted": corrupted, "retrained": retrained, "mia_member_split": mia_member_split,
             "mia_nonmember_split": mia_nonmember_split, "min_k": min_k}, started, argv=argv))
    return result


def compute_unlearning_records(base: str | None, adapters: Sequence[str], splits: Sequence[str], out: Path,
                               max_new_tokens: int = 32, device: str | None = None, retrained: str | None = None,
                               progress: bool | None = None, corrupted: str | None = None,
                               min_k: float = 0.2) -> dict[str, list[dict[str, Any]]]:
    """Load ``base`` with each adapter and score every split's samples (loss, greedy answer, reference, answer-token
    statistics and, with ``retrained``, the KL to it) through mmerase's model adapters (:mod:`mmerase.eval.model_scores`);
    the records are the same ones ``--records`` files hold. ``corrupted`` and ``min_k`` are only checked here, before
    the models run."""
    if not base or not adapters or not splits:
        raise UserError("computing records needs --base, --adapters NAME=DIR ... and --splits SPLIT=FILE ...")
    named_adapters = {k: str(v) for k, v in parse_named_files(adapters, "--adapters").items()}
    named_splits = parse_named_files(splits, "--splits")
    for name, path in {**{f"adapter {shown(k)}": Path(v) for k, v in named_adapters.items()},
                       **{f"split {shown(k)}": v for k, v in named_splits.items()}}.items():
        if not path.exists():
            raise UserError(f"{name}: {shown(str(path))} not found")
    for role, name in (("corrupted", corrupted), ("retrained", retrained)):
        if name is not None and name not in named_adapters:
            raise UserError(f"--{role} {shown(name)} is not one of the --adapters: {shown_some(sorted(named_adapters), 10)}")
    if corrupted is not None and retrained is None:
        raise UserError("--corrupted needs --retrained: the recovery ratio is measured between both")
    if not 0 < min_k <= 1:
        raise UserError(f"--min-k must be in (0, 1], got {shown(min_k)}")
    check_out_dir(out)
    from mmerase.models import LoadOptions

    from .model_scores import score_models

    return score_models(base, named_adapters, named_splits, options=LoadOptions(device=device, exact_hvp=False),
                        retrained=retrained, max_new_tokens=max_new_tokens, progress=progress)


def model_inputs(adapters: Sequence[str], splits: Sequence[str]) -> dict[str, Path]:
    """The files behind computed records, for the manifest: each split file and each adapter's weights."""
    out = {f"split:{k}": v for k, v in parse_named_files(splits, "--splits").items()}
    for k, v in parse_named_files(adapters, "--adapters").items():
        weights = [w for w in (v / "adapter_model.safetensors", v / "adapter_model.bin") if w.is_file()]
        if weights:
            out[f"adapter:{k}"] = weights[0]
    return out
