"""The ``mmerase`` command line: a thin layer that turns options into calls of :mod:`mmerase.workflows`.

Every command reads an optional YAML config (``--config``); flags on the command line override it. A config may
hold options at the top level (used by every command that has them) and per-command sections
(``finetune:``, ``unlearn:``, ``generate:``, ``demo:``). Errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .fileio import one_line, shown
from .options import Flag, Group, HelpFormatter, UsageError, add_flags, build, command_flags, config_file_values

EXIT_USER_ERROR = 2
EXIT_SOLVER_FAILED = 3


@dataclass
class Command:
    """A command: its option groups (config dataclasses, :mod:`mmerase.options`) and what runs it."""

    name: str
    help: str
    groups: Callable[[], list[Group]]  # built on first use: the configs import torch, `mmerase --help` need not
    run: Callable[[argparse.Namespace, dict[type, Any]], int]
    shared: tuple[str, ...] = ()

    def flags(self) -> list[Flag]:
        return command_flags(self.groups(), self.shared)

    def configs(self, args: argparse.Namespace) -> dict[type, Any]:
        """Every group's dataclass built from the parsed options (its validation runs), in the groups' order; a
        field typed as an earlier group's class (DemoConfig.solver) takes that group's config."""
        built: dict[type, Any] = {}
        for g in self.groups():
            nested = {f.name: built[cls] for f in dataclasses.fields(g.cls) for cls in built
                      if f.type in (cls, cls.__name__)}
            built[g.cls] = build(g, args, **nested)
        return built


# ----------------------------------------------------------------------------- command bodies
def _load_options(c: dict[type, Any]) -> Any:
    from .models import LoadOptions

    return c[LoadOptions]


def _cmd_finetune(a: argparse.Namespace, c: dict[type, Any]) -> int:
    from .models import LoraSettings
    from .training import TrainConfig
    from .workflows import FinetuneFiles, run_finetune

    files = c[FinetuneFiles]
    rec = run_finetune(files.base, files.data, files.out, train=c[TrainConfig], lora=c[LoraSettings],
                       options=_load_options(c))
    loss = rec["result"]["epoch_losses"]
    print(f"adapter written to {files.out} | final epoch loss {loss[-1]:.4f} | {rec['timings']['total_s']:.1f} s")
    return 0


def _cmd_unlearn(a: argparse.Namespace, c: dict[type, Any]) -> int:
    from .distributed import init_from_env, shutdown
    from .methods import METHODS, MethodOptions
    from .workflows import UnlearnFiles, run_unlearn

    files, choice = c[UnlearnFiles], c[MethodOptions]
    _refuse_foreign_method_options(a, choice.method)
    dist = init_from_env()  # torchrun/deepspeed launch: one process group, rank 0 writes
    try:
        outcome = run_unlearn(files.base, files.adapter, files.data, files.edits, files.out,
                              solver=c[_solver_config()], options=_load_options(c), deepspeed_config=files.deepspeed,
                              prepared=files.prepared, method=choice.method,
                              method_config=c[METHODS[choice.method].config_class], budget=choice.budget,
                              retrain_passes=choice.retrain_passes, estimate=choice.estimate,
                              allow_other_data=files.allow_other_data,
                              allow_outside_images=files.allow_outside_images)
    finally:
        shutdown(dist)
    if not dist.is_main:
        return 0
    if outcome.estimate is not None:
        print(_estimate_line(outcome.estimate))
        return 0
    done, acc = outcome.method, outcome.method.accounting
    if outcome.result is not None:
        r, tol = outcome.result, done.config.tol
        state = "converged" if r.converged else f"NOT converged (tol {tol:g})"
        what = f"residual {r.residual:.2e} ({state}, {r.steps} steps)"
    elif "step_losses" in done.info:
        losses = done.info["step_losses"]
        what = f"{done.method}: {done.info['steps']} steps, loss {losses[0]:.4f} → {losses[-1]:.4f}"
    else:
        what = f"{done.method}: {done.info.get('summary', 'done')}"
    frac = acc.retraining_fraction
    cost = f"{acc.sample_passes:.0f} sample passes" + (f" ({frac:.3g} of a retraining)" if frac is not None else "")
    print(f"unlearned adapter written to {outcome.out} | {what} | {cost} | "
          f"{outcome.record['timings']['total_s']:.1f} s")
    return 0


def _solver_config() -> type:
    from .influence import SolverConfig

    return SolverConfig


def _estimate_line(est: dict[str, Any]) -> str:
    frac = est.get("retraining_fraction")
    costs = est["costs"]
    bound = "" if est["exact"] else "at most "
    steps = f"{est['steps']} steps, " if "steps" in est else ""
    measured = f"one sample pass {costs['sample_pass_s']:.3g} s"
    if costs.get("product_cost_gradients"):
        measured += (f"; a product per sample {costs['product_sample_passes']:.3g} sample passes, "
                     f"{costs['product_cost_gradients']:.2f} gradients in time")
    return (f"estimate for --method {est['method']}: {steps}{bound}{est['sample_passes']:.0f} sample passes"
            + (f" ({frac:.3g} of a retraining)" if frac is not None else "")
            + f", {bound}about {est['seconds']:.1f} s (measured: {measured}); nothing was written")


def _refuse_foreign_method_options(a: argparse.Namespace, method: str) -> None:
    """An option of another method's config set to a non-default value is a mistake: say so instead of ignoring it."""
    from .methods import METHODS

    own = {fl.dest for fl in Group(METHODS[method].config_class).flags()}
    for name, cls in METHODS.items():
        if name == method or cls.config_class is _solver_config():
            continue
        for fl in Group(cls.config_class).flags():
            if fl.dest not in own and getattr(a, fl.dest, fl.default) != fl.default:
                raise UsageError(f"{fl.flag} does not apply to --method {method} (it is an option of --method {name})")


def _cmd_prepare(a: argparse.Namespace, c: dict[type, Any]) -> int:
    from .influence import PreconditionerConfig, SolverConfig
    from .workflows import PrepareFiles, run_prepare

    files = c[PrepareFiles]
    prep = run_prepare(files.base, files.adapter, files.data, files.out, solver=c[SolverConfig],
                       config=c[PreconditionerConfig], options=_load_options(c),
                       allow_other_data=files.allow_other_data)
    build_info = prep.record["build"]
    print(f"preparation ({prep.record['kind']}) written to {files.out} | {build_info['products']} products, "
          f"{prep.record['timings']['prepare_s']:.1f} s")
    return 0


def _cmd_generate(a: argparse.Namespace, c: dict[type, Any]) -> int:
    from .workflows import GenerateFiles, run_generate

    files = c[GenerateFiles]
    info = run_generate(files.base, files.adapter, files.data, files.out, options=_load_options(c),
                        batch_size=files.batch_size, max_new_tokens=files.max_new_tokens, progress=files.progress)
    print(f"{info['n']} answers written to {info['out']} | {info['seconds']:.1f} s")
    return 0


def _cmd_demo(a: argparse.Namespace, c: dict[type, Any]) -> int:
    from .demo import DemoConfig, DemoFiles, run_demo

    report = run_demo(c[DemoFiles].out, c[DemoConfig])
    print(f"demo report written to {report['out']} ({report['seconds']:.0f} s)")
    return 0


def _cmd_eval(argv: list[str]) -> int:
    try:
        from .eval.cli import main as eval_main
    except ImportError as e:  # pragma: no cover - eval ships with the package
        raise UsageError(f"the evaluation harness is not installed: {e}") from None
    return eval_main(argv, prog="mmerase eval")


# ----------------------------------------------------------------------------- the commands' options
LOAD = ("dtype", "quantization", "local_files_only", "device", "gradient_checkpointing")


def _finetune_groups() -> list[Group]:
    from .models import LoadOptions, LoraSettings
    from .training import TrainConfig
    from .workflows import FinetuneFiles

    return [Group(FinetuneFiles), Group(LoadOptions, only=LOAD, fixed={"exact_hvp": True}),
            Group(LoraSettings), Group(TrainConfig)]


def _unlearn_groups() -> list[Group]:
    from .influence import SolverConfig
    from .methods import METHODS, MethodOptions
    from .models import LoadOptions
    from .workflows import UnlearnFiles

    others = [Group(cls.config_class) for cls in METHODS.values() if cls.config_class is not SolverConfig]
    return [Group(UnlearnFiles), Group(LoadOptions, only=LOAD), Group(MethodOptions), Group(SolverConfig), *others]


#: options every gradient method has (one flag sets them all)
METHOD_SHARED = ("progress", "method_lr", "method_batch_size", "method_seed", "method_schedule", "method_warmup_steps",
                 "method_weight_decay", "method_max_grad_norm", "retain_weight")


def _prepare_groups() -> list[Group]:
    from .influence import PreconditionerConfig, SolverConfig
    from .models import LoadOptions
    from .workflows import PrepareFiles

    return [Group(PrepareFiles), Group(LoadOptions, only=LOAD),
            Group(SolverConfig, only=("curvature", "damping", "damping_scale", "damping_steps", "batch_size", "seed",
                                      "curvature_samples", "fd_eps", "ggn_jvp", "progress")),
            Group(PreconditionerConfig)]


def _generate_groups() -> list[Group]:
    from .models import LoadOptions
    from .workflows import GenerateFiles

    return [Group(GenerateFiles), Group(LoadOptions, only=LOAD, fixed={"exact_hvp": False})]


def _demo_groups() -> list[Group]:
    from .demo import DEMO_SOLVER, DemoConfig, DemoFiles
    from .influence import SolverConfig

    exposed = ("method", "curvature", "damping", "damping_scale", "refine_steps", "refine_damping", "tol",
               "residual_samples", "progress")
    return [Group(DemoFiles),
            Group(SolverConfig, only=exposed, defaults=DEMO_SOLVER,
                  fixed={k: v for k, v in DEMO_SOLVER.items() if k not in exposed}),
            Group(DemoConfig, defaults={"tasks": "all"})]


COMMANDS = [
    Command("finetune", "train a LoRA adapter (also the retrain-from-scratch baseline)", _finetune_groups,
            _cmd_finetune, shared=("seed", "progress")),
    Command("unlearn", "remove / modify / correct / add training samples: writes a NEW adapter folder",
            _unlearn_groups, _cmd_unlearn, shared=METHOD_SHARED),
    Command("prepare", "once per adapter: save a preconditioner that makes every later `unlearn --prepared` cheap",
            _prepare_groups, _cmd_prepare, shared=("batch_size", "seed", "progress")),
    Command("generate", "greedy answers for an evaluation file (JSONL out: id, answer)", _generate_groups,
            _cmd_generate),
    Command("demo", "unlearn corrupted image-text pairs on real digit images (CPU or GPU)", _demo_groups, _cmd_demo,
            shared=("progress",)),
]


# ----------------------------------------------------------------------------- parsing
def config_values(path: str, cmd: Command) -> dict[str, Any]:
    """The config file's values that apply to ``cmd``, converted like command-line values; unknown keys are
    errors (see :func:`mmerase.options.config_file_values`)."""
    known = {fl.dest for c in COMMANDS for fl in c.flags()} | {"config"}
    known |= {fl.alias[0].lstrip("-").replace("-", "_") for c in COMMANDS for fl in c.flags() if fl.alias}
    return config_file_values(path, cmd.name, cmd.flags(), known, {c.name for c in COMMANDS})


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and suggestions for mistyped choices."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {one_line(message)}\n")


def _build(cmd: Command) -> argparse.ArgumentParser:
    p = _Parser(prog=f"mmerase {cmd.name}", description=cmd.help, formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML config file; command-line flags override its values", default=None)
    add_flags(p, cmd.flags())
    return p


def _parse(cmd: Command, argv: list[str]) -> argparse.Namespace:
    parser = _build(cmd)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**config_values(pre.config, cmd))
    args = parser.parse_args(argv)
    missing = [fl.flag for fl in cmd.flags() if fl.required and getattr(args, fl.dest) is None]
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
    from .methods import MethodError
    from .models import ModelLoadError
    from .fileio import FileFormatError, OutputExistsError, OutputPathError

    return (UsageError, DataError, InfluenceError, MethodError, ModelLoadError, OutputExistsError, OutputPathError,
            FileFormatError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that partial outputs are removed on the way out (Python's default
    SIGTERM ends the process without unwinding, leaving them behind)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _on_sigterm() -> Any:
    """Install the SIGTERM handler for the command's run; returns the previous one (None off the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _quiet_libraries(command: str) -> None:
    """Our own progress bars and summary line are the output; silence the libraries' loading chatter. mmerase's
    own warnings (logger ``mmerase``) print as one line each, bounded."""
    import warnings

    ours = logging.getLogger("mmerase")
    for old in [h for h in ours.handlers if isinstance(h, _WarningLines)]:
        ours.removeHandler(old)
    ours.addHandler(_WarningLines(command))
    ours.setLevel(logging.WARNING)

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


class _WarningLines(logging.Handler):
    """mmerase's warnings as ``mmerase COMMAND: warning: …`` lines on the current stderr, bounded and escaped like
    the CLI's error lines."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        print(f"mmerase {self.command}: warning: {one_line(record.getMessage())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    previous = _on_sigterm()
    try:
        return _main(argv)
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    name, rest = argv[0], argv[1:]
    cmds = {c.name: c for c in COMMANDS}
    try:
        if name == "eval":
            return _cmd_eval(rest)
        if name not in cmds:
            close = difflib.get_close_matches(name, list(cmds) + ["eval"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"unknown command {shown(name)}{hint}; run `mmerase --help`")
        cmd = cmds[name]
        args = _parse(cmd, rest)
        _quiet_libraries(name)
        return cmd.run(args, cmd.configs(args))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("mmerase: interrupted; no output was written", file=sys.stderr)
        return 130
    except Terminated:
        print("mmerase: terminated (SIGTERM); no output was written", file=sys.stderr)
        return 143
    except Exception as e:
        from .influence import SolverDivergedError

        if os.environ.get("MMERASE_DEBUG"):
            traceback.print_exc()
        msg = one_line(str(e).split("\n")[0] if str(e) else type(e).__name__)
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
