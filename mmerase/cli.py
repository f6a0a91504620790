"""The ``mmerase`` command line: a thin layer that turns options into calls of :mod:`mmerase.workflows`.

Every command reads an optional YAML config (``--config``); flags on the command line override it. A config may
hold options at the top level (used by every command that has them) and per-command sections
(``finetune:``, ``unlearn:``, ``generate:``, ``demo:``). Errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
EXIT_SOLVER_FAILED = 3


class UsageError(ValueError):
    """A problem with the options or config file."""


@dataclass
class Opt:
    flag: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = str
    choices: tuple | None = None
    required: bool = False
    boolean: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _optional_float(text: str) -> float | None:
    return None if str(text).lower() in ("none", "null", "") else float(text)


def _damping(text: str) -> float | str:
    if str(text).lower() == "auto":
        return "auto"
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


def _optional_damping(text: str) -> float | str | None:
    return None if str(text).lower() in ("none", "null", "") else _damping(text)


_damping.__name__ = _optional_damping.__name__ = "damping (a number ≥ 0 or 'auto')"  # argparse names the type


def _optional_int(text: str) -> int | None:
    return None if str(text).lower() in ("none", "null", "") else int(text)


MODEL_OPTS = [
    Opt("--base", "base model: a local checkpoint folder, a hub id, or a preset name (tiny-llava, tiny-llama, "
        "tiny-llava-next, tiny-llava-onevision, tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-qwen3-vl)",
        required=True),
    Opt("--dtype", "dtype of the model and adapter", "float32", choices=("float32", "float64", "bfloat16", "float16")),
    Opt("--load-in-4bit", "load the base 4-bit (NF4, bitsandbytes); the adapter stays in --dtype", False,
        boolean=True),
    Opt("--local-files-only", "never contact the hub when loading the base", False, boolean=True),
    Opt("--device", "cpu, cuda, cuda:1 … (default: cuda when available)", None),
]
SOLVER_OPTS = [
    Opt("--solver", "cg: conjugate gradient (fewest products); stochastic: Adam with mini-batch products "
        "(LLMEraser); lissa; dense: tiny adapters only; prepared: one step with --prepared's preconditioner "
        "(approximate, no solve)", "cg", choices=("cg", "stochastic", "lissa", "dense", "prepared")),
    Opt("--curvature", "hessian: exact; fd-hessian: finite differences (first-order passes); ggn: Gauss-Newton "
        "(PSD); fisher: empirical Fisher (PSD); sampled-fisher: true Fisher from seeded label draws (PSD)", "hessian",
        choices=("hessian", "fd-hessian", "ggn", "fisher", "sampled-fisher")),
    Opt("--damping", "λ added to the curvature (H + λI): a number, or auto: --damping-scale × the curvature's top "
        "eigenvalue (a few Lanczos products), raised when the curvature shows negative eigenvalues or CG meets "
        "them; the λ used is in the run record", "auto", _damping),
    Opt("--damping-scale", "the fraction of the top eigenvalue that --damping auto takes", 1e-2, float),
    Opt("--tol", "stop when ‖(H+λI)δ − b‖/‖b‖ is below this", 1e-4, float),
    Opt("--batch-size", "samples per curvature product / mini-batch", 16, int),
    Opt("--max-steps", "solver iterations", 100, int),
    Opt("--seed", "seed for mini-batch sampling", 0, int),
    Opt("--lr", "Adam step of the stochastic solver (default: from the problem's scale)", None, _optional_float),
    Opt("--curvature-samples", "products over a fixed random subset of this many training samples "
        "(default: all)", None, _optional_int),
    Opt("--refine-steps", "Newton refinement steps after the influence update (each: one gradient pass + a solve; "
        "on the demo, 10 with --refine-damping step and --curvature hessian close the gap to retraining)", 0, int),
    Opt("--refine-damping", "in refinement, λ is a proximal term around the trained adapter (proximal: stays near "
        "it) or damps each Newton step only (step: converges to the undamped edited optimum)", "proximal",
        choices=("proximal", "step")),
]
SCALE_OPTS = [
    Opt("--ggn-jvp", "how ggn computes J·v: autograd (exact, double backward) or fd (first-order passes; the default "
        "under --deepspeed)", None, choices=("autograd", "fd")),
    Opt("--deepspeed", "DeepSpeed ZeRO-3 config (JSON): partition the frozen base across the ranks of a torchrun/"
        "deepspeed launch (first-order curvatures: fd-hessian, ggn, fisher)", None),
]
PREPARED_OPTS = [
    Opt("--prepared", "preparation folder from `mmerase prepare` for this adapter (or one it descends from), data, "
        "curvature and damping: preconditions the solve (same answer, fewer products)", None),
    Opt("--residual-samples", "measure the final residual on a fixed random subset of this many training samples "
        "(default: the curvature set)", None, _optional_int),
    Opt("--stationarity-check", "certify δ by the stationarity gap (two gradient passes over the curvature set)",
        True, boolean=True),
]
PREPARE_OPTS = [
    Opt("--kind", "lowrank: top eigenpairs by Lanczos (exact on them); ekfac / kfac: per-layer Kronecker factors; "
        "diagonal", "lowrank", choices=("lowrank", "ekfac", "kfac", "diagonal")),
    Opt("--rank", "Lanczos steps for --kind lowrank (one curvature product each)", 32, int),
    Opt("--prepare-samples", "build from a fixed random subset of this many training samples (default: all); "
        "requests stay exact", None, _optional_int),
    Opt("--probes", "products calibrating the scale of ekfac/kfac/diagonal", 2, int),
]
LORA_OPTS = [
    Opt("--lora-r", "LoRA rank", 8, int),
    Opt("--lora-alpha", "LoRA alpha", 16.0, float),
    Opt("--lora-dropout", "LoRA dropout", 0.0, float),
    Opt("--lora-targets", "regex of modules to adapt (default: the language model's projections)", None),
    Opt("--train-projector", "also train the multimodal projector, saved with the adapter", False, boolean=True),
]
TRAIN_OPTS = [
    Opt("--epochs", "passes over the data", 3, int),
    Opt("--batch-size", "samples per step", 8, int),
    Opt("--lr", "AdamW learning rate", 1e-3, float),
    Opt("--weight-decay", "AdamW weight decay", 0.0, float),
    Opt("--schedule", "learning-rate schedule", "constant", choices=("constant", "linear", "cosine")),
    Opt("--seed", "seed of the adapter's initialisation and the data order", 0, int),
]
PROGRESS = Opt("--progress", "progress bars (default: only on a terminal)", None, boolean=True)


@dataclass
class Command:
    name: str
    help: str
    opts: list[Opt]
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    extra: list[Opt] = field(default_factory=list)


# ----------------------------------------------------------------------------- command bodies
def _load_options(a: argparse.Namespace, exact: bool = True) -> Any:
    from .models import LoadOptions

    return LoadOptions(dtype=a.dtype, quantization="nf4" if a.load_in_4bit else None, device=a.device,
                       local_files_only=a.local_files_only, exact_hvp=exact)


def _cmd_finetune(a: argparse.Namespace) -> int:
    from .models import LoraSettings
    from .training import TrainConfig
    from .workflows import run_finetune

    lora = LoraSettings(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, target_modules=a.lora_targets,
                        train_projector=a.train_projector, seed=a.seed)
    train = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                        schedule=a.schedule, seed=a.seed, progress=a.progress)
    rec = run_finetune(a.base, a.data, a.out, train=train, lora=lora, options=_load_options(a))
    loss = rec["result"]["epoch_losses"]
    print(f"adapter written to {a.out} | final epoch loss {loss[-1]:.4f} | {rec['timings']['total_s']:.1f} s")
    return 0


def _cmd_unlearn(a: argparse.Namespace) -> int:
    from .distributed import init_from_env, shutdown
    from .influence import SolverConfig
    from .workflows import run_unlearn

    ggn_jvp = a.ggn_jvp or ("fd" if a.deepspeed else "autograd")
    solver = SolverConfig(method=a.solver, curvature=a.curvature, damping=a.damping,
                          damping_scale=a.damping_scale, tol=a.tol, batch_size=a.batch_size,
                          max_steps=a.max_steps, seed=a.seed, lr=a.lr,
                          curvature_samples=a.curvature_samples, refine_steps=a.refine_steps,
                          refine_damping=a.refine_damping, ggn_jvp=ggn_jvp, progress=a.progress)
    solver.residual_samples, solver.stationarity_check = a.residual_samples, a.stationarity_check
    exact = a.curvature == "hessian" or (a.curvature == "ggn" and ggn_jvp == "autograd")
    dist = init_from_env()  # torchrun/deepspeed launch: one process group, rank 0 writes
    try:
        outcome = run_unlearn(a.base, a.adapter, a.data, a.edits, a.out, solver=solver,
                              options=_load_options(a, exact=exact), deepspeed_config=a.deepspeed,
                              prepared=a.prepared)
    finally:
        shutdown(dist)
    if not dist.is_main:
        return 0
    r = outcome.result
    state = "converged" if r.converged else f"NOT converged (tol {a.tol:g})"
    print(f"unlearned adapter written to {outcome.out} | residual {r.residual:.2e} ({state}, {r.steps} steps) | "
          f"{outcome.record['timings']['total_s']:.1f} s")
    return 0


def _cmd_prepare(a: argparse.Namespace) -> int:
    from .influence import SolverConfig
    from .influence.precondition import PreconditionerConfig
    from .workflows import run_prepare

    solver = SolverConfig(curvature=a.curvature, damping=a.damping, damping_scale=a.damping_scale,
                          batch_size=a.batch_size, seed=a.seed, progress=a.progress)
    config = PreconditionerConfig(kind=a.kind, rank=a.rank, samples=a.prepare_samples, batch_size=a.batch_size,
                                  probes=a.probes, seed=a.seed, progress=a.progress)
    prep = run_prepare(a.base, a.adapter, a.data, a.out, solver=solver, config=config,
                       options=_load_options(a, exact=a.curvature in ("hessian", "ggn")))
    build = prep.record["build"]
    print(f"preparation ({prep.record['kind']}) written to {a.out} | {build['products']} products, "
          f"{prep.record['timings']['prepare_s']:.1f} s")
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from .workflows import run_generate

    info = run_generate(a.base, a.adapter, a.data, a.out, options=_load_options(a, exact=False),
                        batch_size=a.batch_size, max_new_tokens=a.max_new_tokens)
    print(f"{info['n']} answers written to {info['out']} | {info['seconds']:.1f} s")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    tasks = ("rc", "qm", "ir") if a.task == "all" else (a.task,)
    cfg = DemoConfig(tasks=tasks, seed=a.seed, quick=a.quick, corruption=a.corruption, solver=a.solver,
                     curvature=a.curvature, damping=a.damping, damping_scale=a.damping_scale,
                     refine_steps=a.refine_steps, refine_damping=a.refine_damping, progress=a.progress)
    report = run_demo(a.out, cfg)
    print(f"demo report written to {report['out']} ({report['seconds']:.0f} s)")
    return 0


def _cmd_eval(argv: list[str]) -> int:
    try:
        from eval.cli import main as eval_main
    except ImportError as e:  # pragma: no cover - eval ships with the package
        raise UsageError(f"the evaluation harness is not installed: {e}") from None
    return eval_main(argv, prog="mmerase eval")


COMMANDS = [
    Command("finetune", "train a LoRA adapter (also the retrain-from-scratch baseline)",
            MODEL_OPTS + [Opt("--data", "training data (LLaVA-format JSON or JSONL)", required=True),
                          Opt("--out", "new adapter folder (must not exist)", required=True)]
            + LORA_OPTS + TRAIN_OPTS + [PROGRESS], _cmd_finetune),
    Command("unlearn", "remove / modify / correct / add training samples: writes a NEW adapter folder",
            MODEL_OPTS + [Opt("--adapter", "the trained peft adapter folder (only read)", required=True),
                          Opt("--data", "the training data the adapter was trained on", required=True),
                          Opt("--edits", "edits file (JSONL: remove / modify / correct / add)", required=True),
                          Opt("--out", "new adapter folder (must not exist)", required=True)]
            + SOLVER_OPTS + PREPARED_OPTS + SCALE_OPTS + [PROGRESS], _cmd_unlearn),
    Command("prepare", "once per adapter: save a preconditioner that makes every later `unlearn --prepared` cheap",
            MODEL_OPTS + [Opt("--adapter", "the trained peft adapter folder (only read)", required=True),
                          Opt("--data", "the training data the adapter was trained on", required=True),
                          Opt("--out", "new preparation folder (must not exist)", required=True)]
            + [o for o in SOLVER_OPTS if o.flag in ("--curvature", "--damping", "--damping-scale", "--batch-size",
                                                     "--seed")]
            + PREPARE_OPTS + [PROGRESS], _cmd_prepare),
    Command("generate", "greedy answers for an evaluation file (JSONL out: id, answer)",
            MODEL_OPTS + [Opt("--adapter", "peft adapter folder (default: the base alone)", None),
                          Opt("--data", "questions (LLaVA-format JSON or JSONL)", required=True),
                          Opt("--out", "answers file (JSONL; must not exist)", required=True),
                          Opt("--batch-size", "prompts per batch", 8, int),
                          Opt("--max-new-tokens", "answer length limit", 16, int), PROGRESS], _cmd_generate),
    Command("demo", "unlearn corrupted image-text pairs on real digit images (CPU; 15-30 min with the default "
            "refinement, 5 min with --refine-steps 0 --curvature ggn)",
            [Opt("--out", "output folder for report.md, report.json and plots", "mmerase-demo"),
             Opt("--task", "scenario: rc (correct answers), qm (replace images), ir (remove), or all", "all",
                 choices=("rc", "qm", "ir", "all")),
             Opt("--seed", "seed of data split, corruption and training", 0, int),
             Opt("--corruption", "fraction of training pairs corrupted", 0.2, float),
             Opt("--solver", "solver (see `mmerase unlearn --help`)", "cg",
                 choices=("cg", "stochastic", "lissa", "dense")),
             Opt("--curvature", "curvature (see `mmerase unlearn --help`)", "hessian",
                 choices=("hessian", "fd-hessian", "ggn", "fisher")),
             Opt("--damping", "damping λ: a number or auto (default: the demo's validated value)", None,
                 _optional_damping),
             Opt("--damping-scale", "the fraction of the top eigenvalue that --damping auto takes", 1e-2, float),
             Opt("--refine-steps", "Newton refinement steps after the influence update", 10, int),
             Opt("--refine-damping", "λ in refinement: proximal or step (see `mmerase unlearn --help`)",
                 "step", choices=("proximal", "step")),
             Opt("--quick", "reduced sizes (for tests)", False, boolean=True), PROGRESS], _cmd_demo),
]


# ----------------------------------------------------------------------------- config handling
def _all_dests() -> set[str]:
    return {o.dest for c in COMMANDS for o in c.opts} | {"config"}


def _config_defaults(path: str, cmd: Command) -> dict[str, Any]:
    """The config values that apply to ``cmd``, converted like command-line values; unknown keys are errors."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise UsageError(f"config file {path}: expected a mapping of option: value")
    names = {c.name for c in COMMANDS}
    known = _all_dests()
    mine = {o.dest: o for o in cmd.opts}
    values: dict[str, Any] = {}

    def take(key: str, value: Any, section: str | None) -> None:
        dest = key.replace("-", "_")
        where = f"config file {path}: " + (f"section '{section}': " if section else "")
        pool = set(mine) if section else known
        if dest not in pool:
            close = difflib.get_close_matches(dest, sorted(pool), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            scope = f"an option of `mmerase {section}`" if section else "an option of any mmerase command"
            raise UsageError(f"{where}key '{key}' is not {scope}{hint}")
        if dest in mine:
            values[dest] = _convert(mine[dest], value, where)

    for key, value in raw.items():
        if key in names:
            if not isinstance(value, dict):
                raise UsageError(f"config file {path}: section '{key}' must be a mapping")
            continue
        take(key, value, None)
    for key, value in (raw.get(cmd.name) or {}).items():
        take(key, value, cmd.name)
    return values


def _convert(opt: Opt, value: Any, where: str) -> Any:
    if value is None:
        return None
    if opt.boolean:
        if not isinstance(value, bool):
            raise UsageError(f"{where}'{opt.dest}' must be true or false, got {value!r}")
        return value
    try:
        out = opt.type(str(value)) if opt.type else value
    except (TypeError, ValueError):
        raise UsageError(f"{where}'{opt.dest}' has an invalid value {value!r}") from None
    if opt.choices and out not in opt.choices:
        close = difflib.get_close_matches(str(out), [str(c) for c in opt.choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"{where}'{opt.dest}' is {value!r}{hint}; choose one of: {', '.join(opt.choices)}")
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and suggestions for mistyped choices."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def _build(cmd: Command) -> argparse.ArgumentParser:
    p = _Parser(prog=f"mmerase {cmd.name}", description=cmd.help,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML config file; command-line flags override its values", default=None)
    for o in cmd.opts:
        h = o.help + (" (required)" if o.required else "")
        if o.boolean:
            p.add_argument(o.flag, dest=o.dest, action=argparse.BooleanOptionalAction, default=o.default, help=h)
        else:
            p.add_argument(o.flag, dest=o.dest, type=o.type, default=o.default, help=h,
                           choices=o.choices, metavar=o.dest.upper() if not o.choices else None)
    return p


def _parse(cmd: Command, argv: list[str]) -> argparse.Namespace:
    parser = _build(cmd)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_config_defaults(pre.config, cmd))
    args = parser.parse_args(argv)
    missing = [o.flag for o in cmd.opts if o.required and getattr(args, o.dest) is None]
    if missing:
        parser.error(f"missing {missing[0]} (give it on the command line or in the --config file)")
    return args


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmerase", description="Make a fine-tuned (vision-)language model forget or correct training "
                "samples: influence-function updates of its PEFT adapter, without retraining.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="commands:\n" + "\n".join(f"  {c.name:<10}{c.help}" for c in COMMANDS)
                + "\n  eval      judged evaluation (MM-Vet), R-Bench and unlearning metrics"
                + "\n\nRun `mmerase COMMAND --help` for a command's options.")
    p.add_argument("command", nargs="?", help="one of: " + ", ".join([c.name for c in COMMANDS] + ["eval"]))
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .influence import InfluenceError
    from .models import ModelLoadError
    from .record import OutputExistsError

    return (UsageError, DataError, InfluenceError, ModelLoadError, OutputExistsError, FileNotFoundError,
            NotADirectoryError, PermissionError)


def _quiet_libraries() -> None:
    """Our own progress bars and summary line are the output; silence the libraries' loading chatter."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices inside transformers/peft
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("transformers", "peft", "bitsandbytes", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    name, rest = argv[0], argv[1:]
    cmds = {c.name: c for c in COMMANDS}
    try:
        if name == "eval":
            return _cmd_eval(rest)
        if name not in cmds:
            close = difflib.get_close_matches(name, list(cmds) + ["eval"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"unknown command '{name}'{hint}; run `mmerase --help`")
        cmd = cmds[name]
        args = _parse(cmd, rest)
        _quiet_libraries()
        return cmd.run(args)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("mmerase: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as e:
        from .influence import SolverDivergedError

        if os.environ.get("MMERASE_DEBUG"):
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, _user_errors()):
            print(f"mmerase {name}: error: {msg}", file=sys.stderr)
            return EXIT_USER_ERROR
        if isinstance(e, SolverDivergedError):
            print(f"mmerase {name}: solver failed: {msg} (nothing was written)", file=sys.stderr)
            return EXIT_SOLVER_FAILED
        print(f"mmerase {name}: internal error: {type(e).__name__}: {msg} "
              "(set MMERASE_DEBUG=1 for the traceback; nothing was written)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
