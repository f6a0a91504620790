"""Command line of the evaluation harness: ``mmerase eval <command>`` (also ``python -m mmerase.eval <command>``).

Exit codes: 0 done; 1 a judged run stopped or ended with failed judgements (everything answered is cached: rerun the
same command to resume); 2 a user error (missing/malformed input, bad option, unusable output folder); 3 stopped by
``--max-cost`` (rerun, with a higher cap, to resume); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import EvalError, UserError
from .io import one_line, shown
from .judge import Redactor

PROG = "mmerase eval"

EPILOG = textwrap.fill(
    "Every option can also come from --config FILE (YAML: option names as keys, with - or _); flags given on the "
    "command line win. Exit codes: 0 ok, 1 run stopped/failed judgements (rerun resumes), 2 user error, 3 --max-cost "
    "reached, 130 interrupted.", width=100)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=100)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as a UserError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each option's default to its help (unless it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "%(default)" in h or action.default in (None, argparse.SUPPRESS) or action.dest == "help":
            return h
        if action.default is False:
            return h + " (default: off)"
        if isinstance(action.default, list) and not action.default:
            return h
        return h + " (default: %(default)s)"


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise ValueError(text)
    return v


def _nonneg_float(text: str) -> float:
    v = float(text)
    if v < 0:
        raise ValueError(text)
    return v


def _add_common(p: argparse.ArgumentParser, places: int) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="YAML file of option values (keys = option names); command-line flags override it")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (created if missing) [required]")
    p.add_argument("--decimal-places", type=_nonneg_int, default=places, metavar="N",
                   help="decimals in the Markdown table (JSON keeps full precision)")


def _add_mmvet(sub: Any) -> argparse.ArgumentParser:
    """The ``mmvet`` subcommand's options."""
    p = sub.add_parser("mmvet", help="judge MM-Vet / MM-Vet v2 predictions with an OpenAI-compatible LLM",
                       formatter_class=_HelpFormatter, epilog=EPILOG, description=_wrap(
                           "Grade open-ended predictions with an LLM judge as the official MM-Vet evaluator does "
                           "(few-shot prompt, temperature 0, 3 tokens, parse retries at rising temperature, N runs, "
                           "per-capability and per-combination scores). Answers are cached in <out>/judge_cache.jsonl "
                           "as they arrive: an interrupted run resumes without asking anything twice. The API key is "
                           "read from the environment and never printed or written."))
    g = p.add_argument_group("inputs")
    g.add_argument("--metadata", type=Path, metavar="FILE",
                   help="MM-Vet metadata: mm-vet.json / mm-vet-v2.json ({id: {question, answer, capability, ...}}) "
                        "or JSONL records with question_id [required]")
    g.add_argument("--predictions", type=Path, metavar="FILE",
                   help="model answers: official {id: answer} JSON, or JSONL {question_id, text} [required]")
    g.add_argument("--subset", type=Path, metavar="FILE", help="JSON list of ids to judge (default: all)")
    g.add_argument("--mmvet-version", choices=["auto", "v1", "v2"], default="auto",
                   help="prompt layout; auto = v2 when questions contain <IMG>")
    g.add_argument("--model-name", metavar="NAME", help="row label in the tables (default: predictions file name)")
    g = p.add_argument_group("judge endpoint")
    g.add_argument("--judge-model", metavar="NAME", help="judge model (Azure: deployment) name; the official "
                   "evaluator used gpt-4-0613 [required]")
    g.add_argument("--base-url", metavar="URL", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 "
                   "(default: the openai package's, i.e. api.openai.com)")
    g.add_argument("--api-key-env", metavar="VAR",
                   help="environment variable holding the API key (default: OPENAI_API_KEY, or AZURE_OPENAI_API_KEY "
                        "with --azure)")
    g.add_argument("--azure", action="store_true", help="use Azure OpenAI (--base-url = the resource endpoint)")
    g.add_argument("--api-version", metavar="V", help="Azure API version (default: 2024-06-01)")
    g.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds per request")
    g.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight at once")
    g.add_argument("--max-retries", type=int, default=6, metavar="N",
                   help="retries of a request after 429/5xx/timeout/connection errors (never after a 400)")
    g.add_argument("--backoff-base", type=_nonneg_float, default=1.0, metavar="S",
                   help="first backoff; doubles per retry, jittered in [d/2, d], never below Retry-After")
    g.add_argument("--backoff-max", type=_nonneg_float, default=60.0, metavar="S", help="longest backoff")
    g = p.add_argument_group("grading (defaults = official procedure)")
    g.add_argument("--runs", type=int, default=1, metavar="N", help="independent judging runs (MM-Vet paper: 5)")
    g.add_argument("--temperature", type=float, default=0.0, help="judge temperature of the first ask")
    g.add_argument("--max-tokens", type=int, default=3, metavar="N", help="judge completion length")
    g.add_argument("--parse-retries", type=int, default=4, metavar="N",
                   help="re-asks when the reply has no score (the official script's 5th re-ask is never read, so it "
                        "is not made)")
    g.add_argument("--retry-temperature-step", type=float, default=0.5, metavar="T",
                   help="k-th parse retry runs at temperature + step*(k-1) (capped at 2.0)")
    g.add_argument("--unparseable", choices=["zero", "failure"], default="zero",
                   help="a reply that stays unparseable: 'zero' scores it 0.0 like the official evaluator (listed in "
                        "the report); 'failure' leaves the run without a score")
    g.add_argument("--rejected", choices=["failure", "zero"], default="failure",
                   help="a request the judge rejects (HTTP 400-class, never retried): 'failure' leaves the run "
                        "without a score until a rerun gets an answer; 'zero' scores it 0.0 as the official v2 "
                        "evaluator does (listed in the report)")
    g.add_argument("--prompt-file", type=Path, metavar="FILE",
                   help="use this text as the few-shot preamble instead of the built-in one (e.g. the official "
                        "prompt, for exact reproduction)")
    g.add_argument("--retry-suffix", metavar="TEXT", help="text appended to the prompt on parse retries "
                   "(default: a built-in 'reply with the score only' line)")
    g.add_argument("--official-evaluator", type=Path, metavar="FILE",
                   help="your copy of MM-Vet's evaluator script (mm-vet_evaluator.py or mm-vet-v2_evaluator.py): its "
                        "grading prompt, retry wording and prompt layout are used, so scores equal what that script "
                        "computes with the same judge (the file is read, never run; this package ships no MM-Vet "
                        "text)")
    g = p.add_argument_group("safety and cost")
    g.add_argument("--max-failures", type=int, default=10, metavar="N",
                   help="stop when more than N judgements have failed (API error or unparseable)")
    g.add_argument("--max-cost", type=_nonneg_float, metavar="USD",
                   help="stop cleanly before this invocation spends more (needs a known price)")
    g.add_argument("--price-table", type=Path, metavar="FILE",
                   help="YAML/JSON {model: {input: USD/1M tokens, output: USD/1M tokens}} (default: built-in list "
                        "prices)")
    g.add_argument("--price-in", type=_nonneg_float, metavar="USD", help="input price per 1M tokens (with --price-out)")
    g.add_argument("--price-out", type=_nonneg_float, metavar="USD", help="output price per 1M tokens")
    g.add_argument("--cache", type=Path, metavar="FILE",
                   help="judge cache file (default: <out>/judge_cache.jsonl): a new or empty file, or one an earlier "
                        "run made (first line {\"mmerase_judge_cache\": 1}); any other file is refused untouched")
    g.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar on stderr; auto = only on a terminal")
    _add_common(p, 1)

    return p


def _add_rbench(sub: Any) -> argparse.ArgumentParser:
    """The ``rbench`` subcommand's options."""
    p = sub.add_parser("rbench", help="R-Bench / POPE yes-no metrics per id subset and averaged",
                       formatter_class=_HelpFormatter, epilog=EPILOG, description=_wrap(
                           "Accuracy, precision, recall, F1 and yes-ratio (x100) of yes/no answers, per id subset "
                           "and averaged over subsets, with the official POPE/R-Bench parsing rule or a strict one "
                           "that reports unclear answers separately. Questions without a prediction are reported."))
    p.add_argument("--questions", type=Path, metavar="FILE",
                   help="question file (JSON list or JSONL) with question_id, text, image, label [required]")
    p.add_argument("--predictions", type=Path, metavar="FILE", help="answers JSONL {question_id, text} [required]")
    p.add_argument("--subset-ids", type=Path, nargs="+", default=[], metavar="FILE",
                   help="id subset files (JSON lists; R-Bench ships five per level; a name with 'holder', as in "
                        "R-Bench's eval.sh, stands for the files with holder = 1..5); default: one subset of all "
                        "questions")
    p.add_argument("--eval", choices=["subsets", "web", "box"], default="subsets",
                   help="what to score, as R-Bench's eval.py: 'subsets' = yes/no metrics per --subset-ids file and "
                        "their average (its --eval_image / --eval_instance / --eval_obj); 'web' = yes/no metrics per "
                        "question 'type' and in total (its --eval_web); 'box' = accuracy of naming the boxed object, "
                        "i.e. the question's label[0] appears in the answer (its --eval_box; questions as JSON Lines "
                        "with a 'label' list)")
    p.add_argument("--mode", choices=["official", "strict"], default="official",
                   help="yes/no answer parsing: official POPE/R-Bench rule, or strict (unclear answers reported, not "
                        "'yes')")
    p.add_argument("--label-field", default="label", metavar="KEY", help="ground-truth field of a question")
    _add_common(p, 2)

    return p


def _add_rbench_draw(sub: Any) -> argparse.ArgumentParser:
    """The ``rbench-draw`` subcommand's options."""
    p = sub.add_parser("rbench-draw", help="draw R-Bench instance boxes/masks and rewrite the questions",
                       formatter_class=_HelpFormatter, epilog=EPILOG)
    p.add_argument("--questions", type=Path, metavar="FILE",
                   help="instance-level questions (subject, object, sub_box, obj_box, image) [required]")
    p.add_argument("--image-dir", type=Path, metavar="DIR", help="folder the questions' image paths are in [required]")
    p.add_argument("--kind", choices=["box", "mask"], default="box", help="draw boxes or masks")
    p.add_argument("--mask-dir", type=Path, metavar="DIR", help="folder of <question_id>.png masks (--kind mask)")
    p.add_argument("--sub-color", default="red", help="subject colour")
    p.add_argument("--obj-color", default="green", help="object colour")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="YAML file of option values (keys = option names); command-line flags override it")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder [required]")

    return p


def _add_unlearning(sub: Any) -> argparse.ArgumentParser:
    """The ``unlearning`` subcommand's options."""
    p = sub.add_parser("unlearning", help="forgetting, privacy and distance-to-retraining metrics per adapter",
                       formatter_class=_HelpFormatter, epilog=EPILOG, description=_wrap(
                           "Per adapter: loss/accuracy/ROUGE-L per split and recovery ratios; membership-inference "
                           "AUCs of forget vs held-out samples from the loss, Min-K%, Min-K%++ and zlib scores; "
                           "KL(retrained || adapter) of next-token distributions on each split; the forget-quality "
                           "KS p-value against the retrained adapter. Writes one table (unlearning_summary.md/.json) "
                           "and one figure (unlearning_summary.png). Records come from --records files (one JSONL of "
                           "per-sample results per adapter) or are computed from --base/--adapters/--splits."))
    p.add_argument("--records", nargs="+", default=[], metavar="NAME=FILE",
                   help="per-adapter per-sample JSONL files, e.g. corrupted=c.jsonl retrained=r.jsonl "
                        "unlearned=u.jsonl [required unless --base/--adapters/--splits are given]")
    p.add_argument("--base", metavar="BASE", help="compute the records here instead: base model (folder, hub id "
                   "or mmerase preset) that the --adapters belong to")
    p.add_argument("--adapters", nargs="+", default=[], metavar="NAME=DIR",
                   help="peft adapter folders to evaluate, e.g. corrupted=a retrained=b unlearned=c")
    p.add_argument("--splits", nargs="+", default=[], metavar="SPLIT=FILE",
                   help="LLaVA-format data files, e.g. forget=f.json retain=r.json test=t.json")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length when computing records")
    p.add_argument("--device", default=None, help="device when computing records (default: cuda if available)")
    p.add_argument("--corrupted", metavar="NAME", help="adapter trained on the data to forget (recovery ratio 0)")
    p.add_argument("--retrained", metavar="NAME", help="adapter retrained without it (recovery ratio 1)")
    p.add_argument("--mia-member-split", default="forget", metavar="SPLIT",
                   help="members for the MIA AUCs, and the split of the forget-quality KS test")
    p.add_argument("--mia-nonmember-split", default="test", metavar="SPLIT",
                   help="held-out non-members for the MIA AUCs")
    p.add_argument("--min-k", type=float, default=0.2, metavar="K",
                   help="fraction of the answer's lowest token scores that Min-K%% and Min-K%%++ average")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bars on stderr when computing records; auto = only on a terminal")
    _add_common(p, 4)
    return p


def build_parser(prog: str = PROG) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's parser (the latter validate ``--config`` keys)."""
    parser = _Parser(prog=prog, description=__doc__, formatter_class=_HelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="{mmvet,rbench,rbench-draw,unlearning}", parser_class=_Parser)
    subs = {"mmvet": _add_mmvet(sub), "rbench": _add_rbench(sub), "rbench-draw": _add_rbench_draw(sub),
            "unlearning": _add_unlearning(sub)}
    return parser, subs


_REQUIRED = {
    "mmvet": ("metadata", "predictions", "judge_model", "out"),
    "rbench": ("questions", "predictions", "out"),
    "rbench-draw": ("questions", "image_dir", "out"),
    "unlearning": ("out",),
}


def parse_args(argv: Sequence[str], prog: str = PROG) -> argparse.Namespace:
    """Parse flags over config-file values; required options are checked after the merge."""
    from .cli_config import config_defaults

    parser, subs = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command is None:
        raise UserError(f"{prog}: choose a command: mmvet, rbench, rbench-draw or unlearning (see --help)")
    if getattr(args, "config", None) is not None:
        sp = subs[args.command]
        sp.set_defaults(**config_defaults(sp, args.config, args.command))
        args = parser.parse_args(argv)
    missing = [d for d in _REQUIRED[args.command] if getattr(args, d) in (None, [])]
    if missing:
        flags = ", ".join("--" + d.replace("_", "-") for d in missing)
        raise UserError(f"{prog} {args.command}: missing required option(s) {flags} (flag or config key)")
    return args


def key_env(args: argparse.Namespace) -> str:
    """Name of the environment variable that holds the judge's API key."""
    return args.api_key_env or ("AZURE_OPENAI_API_KEY" if args.azure else "OPENAI_API_KEY")


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.command == "mmvet":
        from .mmvet import GradeOptions
        from .mmvet_run import MMVetRun, run_mmvet

        progress = {"on": True, "off": False}.get(args.progress, sys.stderr.isatty())
        cfg = MMVetRun(
            metadata=args.metadata, predictions=args.predictions, out=args.out, judge_model=args.judge_model,
            base_url=args.base_url, runs=args.runs, version=args.mmvet_version,
            grade=GradeOptions(temperature=args.temperature, max_tokens=args.max_tokens,
                               parse_retries=args.parse_retries, retry_temperature_step=args.retry_temperature_step,
                               retry_suffix=args.retry_suffix),
            unparseable=args.unparseable, rejected=args.rejected, concurrency=args.concurrency, max_failures=args.max_failures,
            max_cost=args.max_cost, timeout=args.timeout, max_retries=args.max_retries,
            backoff_base=args.backoff_base, backoff_max=args.backoff_max, api_key_env=key_env(args),
            azure=args.azure, api_version=args.api_version, price_table=args.price_table, price_in=args.price_in,
            price_out=args.price_out, cache=args.cache, subset=args.subset, prompt_file=args.prompt_file,
            official_evaluator=args.official_evaluator,
            model_name=args.model_name, decimal_places=args.decimal_places, progress=progress, argv=list(argv),
        )
        summary = run_mmvet(cfg)
        agg = summary["scores"]
        print(f"{summary['benchmark']} {summary['model']}: total {agg['total']:.{args.decimal_places}f} "
              f"(std {agg['std']:.{args.decimal_places}f} over {summary['num_runs']} run(s)); "
              f"results in {args.out}")
        return 0
    if args.command == "rbench":
        from .commands import run_rbench

        res = run_rbench(args.questions, args.predictions, args.out, args.subset_ids, args.mode, args.label_field,
                         args.decimal_places, argv=list(argv), eval_kind=args.eval)
        print(rbench_line(res, args))
        return 0
    if args.command == "rbench-draw":
        from .commands import run_rbench_draw

        n = run_rbench_draw(args.questions, args.image_dir, args.out, args.kind, args.mask_dir, args.sub_color,
                            args.obj_color, argv=list(argv))
        print(f"rbench-draw: {n} question(s) written to {args.out}")
        return 0
    if args.command == "unlearning":
        from .commands import compute_unlearning_records, model_inputs, run_unlearning

        computed, computed_from = None, None
        if args.base or args.adapters or args.splits:
            if args.records:
                raise UserError("unlearning: give either --records or --base/--adapters/--splits, not both")
            computed = compute_unlearning_records(args.base, args.adapters, args.splits, args.out,
                                                  args.max_new_tokens, args.device, args.retrained,
                                                  {"on": True, "off": False}.get(args.progress), args.corrupted,
                                                  args.min_k)
            computed_from = model_inputs(args.adapters, args.splits)
        elif not args.records:
            raise UserError("unlearning: missing --records (or --base, --adapters and --splits)")
        run_unlearning(args.records, args.out, args.corrupted, args.retrained, args.mia_member_split,
                       args.mia_nonmember_split, args.decimal_places, argv=list(argv), computed=computed,
                       min_k=args.min_k, computed_from=computed_from)
        print(f"unlearning: table written to {args.out / 'unlearning_summary.md'}, figure to "
              f"{args.out / 'unlearning_summary.png'}")
        return 0
    raise UserError(f"unknown command {shown(args.command)}")  # pragma: no cover


def rbench_line(res: dict[str, Any], args: argparse.Namespace) -> str:
    """The one-line result of ``rbench`` on stdout."""
    places, out = args.decimal_places, args.out
    if args.eval == "box":
        acc, head, tail = res["accuracy"], "rbench box: accuracy", f"over {res['scored']} answer(s)"
    elif args.eval == "web":
        total = res["subsets"]["total"]
        acc, head, tail = total["metrics"]["accuracy"], f"rbench web ({args.mode}): total accuracy", \
            f"over {total['scored']} question(s)"
    else:
        acc, head, tail = res["average"]["accuracy"], f"rbench ({args.mode}): mean accuracy", \
            f"over {len(res['subsets'])} subset(s)"
    if acc is None:
        return f"{head.rsplit(':', 1)[0]}: nothing scored; results in {out}"
    return f"{head} {acc:.{places}f} {tail}; results in {out}"


MAX_LINE_BYTES = 999  # an error or warning line on stderr, its newline making 1000


def stderr_line(message: str) -> str:
    """``message`` as the one line printed on stderr: :func:`mmerase.fileio.one_line` (control characters escaped,
    bounded), then cut to :data:`MAX_LINE_BYTES` of UTF-8, since escapes and multi-byte characters make the text
    longer than the characters it keeps."""
    line = one_line(message)
    data = line.encode("utf-8")
    if len(data) <= MAX_LINE_BYTES:
        return line
    return data[: MAX_LINE_BYTES - len("… (cut)".encode())].decode("utf-8", "ignore") + "… (cut)"


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(stderr_line(f"warning: {message}"), file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point; returns the exit code (see the module docstring) instead of raising.

    ``prog`` names the command in usage and error lines (``mmerase eval`` when dispatched from mmerase's CLI).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("always", category=UserWarning)
        warnings.showwarning = _show_warning
        redact = Redactor()
        try:
            args = parse_args(argv, prog)
            if args.command == "mmvet":
                redact = Redactor(os.environ.get(key_env(args)))
            return _run(args, argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        except EvalError as e:
            print(stderr_line(redact(f"error: {e}")), file=sys.stderr)  # redacted first: a cut key stays hidden
            return e.exit_code
        except KeyboardInterrupt:
            print("error: interrupted; everything answered so far is kept, rerun the same command to resume",
                  file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
