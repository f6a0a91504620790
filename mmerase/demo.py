"""``mmerase demo``: unlearn corrupted image-text pairs from a tiny LLaVA on real handwritten digits, on a CPU.

The tiny LLaVA preset first gets a base competence (full training on a split the adapter never sees). A LoRA
adapter is then fine-tuned on "<image> What digit is this?" → "seven" pairs of which a fraction is corrupted, and
three scenarios are run (each with the same recipe for every adapter):

- **rc** (response correction): corrupted answers are corrected;
- **qm** (query modification): corrupted images (a different digit) are replaced by the right image;
- **ir** (instance removal): the corrupted pairs are removed.

For each, the corrupted adapter, an adapter retrained from scratch on the edited data, and the mmerase-unlearned
adapter (made through the same workflow as ``mmerase unlearn``, from files on disk) are compared on held-out digits
and on the edited samples. The demo writes its data, edits files, adapters, ``report.md``, ``report.json`` and
``report.png`` to the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import DIGIT_WORDS, Sample, digit_images, digit_samples, load_dataset, modify_sample, save_dataset
from .influence import SolverConfig
from .models import LoadOptions, LoraSettings, load_model
from .metrics import recovery_ratio
from .models.presets import build_preset
from .options import option
from .record import atomic_output_dir, machine, versions, write_json
from .training import TrainConfig, finetune, train
from .workflows import run_unlearn

TASK_NAMES = {"rc": "response correction", "qm": "query (image) modification", "ir": "instance removal"}


#: the solver settings of every demo scenario, chosen on the validation split (benchmarks/README.md, fidelity)
DEMO_SOLVER = {"curvature": "hessian", "damping": "auto", "damping_scale": 1e-2, "tol": 1e-2, "max_steps": 100,
               "batch_size": 128, "refine_steps": 10, "refine_damping": "step"}


def parse_tasks(text: str) -> tuple[str, ...]:
    """'all', one scenario, or a comma-separated list of scenarios."""
    names = tuple(TASK_NAMES) if text == "all" else tuple(t.strip() for t in str(text).split(",") if t.strip())
    bad = [t for t in names if t not in TASK_NAMES]
    if bad or not names:
        raise ValueError(text)
    return names


parse_tasks.__name__ = "scenario (rc, qm, ir, all, or a comma-separated list)"


@dataclass
class DemoConfig:
    """Sizes and recipes of the demo; ``quick`` shrinks everything for tests. ``solver`` is what every scenario's
    unlearning runs with (:data:`DEMO_SOLVER` unless given); its seed is the demo's."""

    tasks: tuple[str, ...] = option(tuple(TASK_NAMES), flag="--task", parse=parse_tasks, help=(
        "scenario: rc (correct answers), qm (replace images), ir (remove), all, or a comma-separated list"))
    seed: int = option(0, help="seed of the data split, corruption, training and solver")
    quick: bool = option(False, help="reduced sizes (for tests)")
    corruption: float = option(0.2, help="fraction of training pairs corrupted")
    device: str | None = option(None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    progress: bool | None = option(None, help="progress bars (default: only on a terminal)")
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(**DEMO_SOLVER))
    n_pretrain: int = 500
    n_train: int = 500
    n_test: int = 400
    n_validation: int = 400  # at most; from the digits after the three splits (397 at the default sizes)
    pretrain_epochs: int = 5
    pretrain_lr: float = 1e-3
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 16
    lora_r: int = 8
    threads: int = 1

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if bad:
            raise ValueError(f"unknown demo task '{bad[0]}'; choose from: {', '.join(TASK_NAMES)}")
        if not 0 < self.corruption < 1:
            raise ValueError(f"corruption must be between 0 and 1, got {self.corruption}")
        if self.quick:
            self.n_pretrain, self.n_train, self.n_test, self.n_validation = 300, 120, 100, 100
            self.pretrain_epochs, self.epochs = 5, 4
        self.solver = dataclasses.replace(self.solver, seed=self.seed, progress=self.progress)

    def load_options(self) -> LoadOptions:
        """How the demo loads every model (its device; float32)."""
        return LoadOptions(device=self.device)


@dataclass
class DemoFiles:
    """Where `mmerase demo` writes."""

    out: str = option("mmerase-demo", help="output folder for report.md, report.json and plots (must not exist)")


def _split(cfg: DemoConfig) -> tuple[list[int], list[int], list[int]]:
    images, _ = digit_images()
    order = list(range(len(images)))
    random.Random(cfg.seed).shuffle(order)
    need = cfg.n_pretrain + cfg.n_train + cfg.n_test
    if need > len(order):
        raise ValueError(f"the demo needs {need} digits; scikit-learn ships {len(order)}")
    a, b = cfg.n_pretrain, cfg.n_pretrain + cfg.n_train
    return order[:a], order[a:b], order[b:need]


def _pretrain_base(folder: Path, pretrain: list[Sample], cfg: DemoConfig) -> Path:
    """Build the tiny-llava preset and train all its weights on the pre-training split (base competence)."""
    preset = build_preset("tiny-llava", folder, seed=cfg.seed)
    bundle = load_model(preset, lora=LoraSettings(r=1), options=cfg.load_options())
    base = bundle.model.get_base_model()
    for name, p in base.named_parameters():  # all base weights train; the zero-effect LoRA stays frozen
        p.requires_grad_("lora_" not in name)
    train(bundle.model, bundle.loss_fn, pretrain, bundle.collate,
          TrainConfig(epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size, lr=cfg.pretrain_lr, schedule="cosine",
                      seed=cfg.seed, progress=cfg.progress))
    merged = bundle.model.unload()  # drop the (untrained, zero-effect) LoRA r=1 again
    merged.save_pretrained(folder)
    return folder


def _train_adapter(base: Path, samples: list[Sample], out: Path, cfg: DemoConfig) -> float:
    bundle = load_model(base, lora=LoraSettings(r=cfg.lora_r, alpha=2.0 * cfg.lora_r, seed=cfg.seed),
                        options=cfg.load_options())
    res = finetune(bundle, samples, TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                                schedule="cosine", seed=cfg.seed, progress=cfg.progress), out)
    return res.seconds


def evaluate_adapter(base: Path, adapter: Path, sets: dict[str, tuple[list[Sample], list[int]]], cfg: DemoConfig
                     ) -> dict[str, float]:
    """Accuracy of greedy answers and mean loss L(z) on each named sample set, for an adapter on disk."""
    return evaluate_bundle(load_model(base, adapter=adapter, options=cfg.load_options()), sets, cfg.progress)


def evaluate_bundle(bundle: Any, sets: dict[str, tuple[list[Sample], list[int]]], progress: bool | None = None
                    ) -> dict[str, float]:
    """Accuracy of greedy answers and mean loss L(z) on each named sample set, for a loaded model."""
    out: dict[str, float] = {}
    for name, (samples, labels) in sets.items():
        if not samples:
            continue
        answers = bundle.generate(samples, max_new_tokens=8, batch_size=64, progress=progress)
        out[f"{name}_acc"] = sum(a == DIGIT_WORDS[y] for a, y in zip(answers, labels)) / len(labels)
        out[f"{name}_loss"] = float(bundle.per_sample_losses(samples, batch_size=64).mean())
    return out


def _write_edits(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")


def run_demo(out: str | Path, cfg: DemoConfig | None = None) -> dict[str, Any]:
    """Run the demo scenarios and write everything to ``out`` (which must not exist); returns the report."""
    cfg = cfg or DemoConfig()
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with atomic_output_dir(out) as tmp:
            report = _run(tmp, cfg)
            report["seconds"] = time.perf_counter() - t_start
            write_json(tmp / "report.json", report)
            (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
            _plot(report, tmp / "report.png")
    finally:
        torch.set_num_threads(threads)
    report["out"] = str(out)
    return report


@dataclass
class Scenarios:
    """Everything the demo's scenarios share, on disk: the base, data and edits files, the corrupted and retrained
    adapters, and the held-out splits (``validation``: the digits neither trained on nor tested; for choosing
    defaults, so that the test split is only reported)."""

    root: Path
    base: Path
    data_dir: Path
    adapters: Path
    clean: list[Sample]
    corrupted_rc: list[Sample]
    bad: list[int]
    bad_ids: list[str]
    wrong_label: dict[int, int]
    edited_truth: list[int]
    test: tuple[list[Sample], list[int]]
    validation: tuple[list[Sample], list[int]]
    sizes: dict[str, int]
    timings: dict[str, float]

    def train_file(self, task: str) -> Path:
        return self.data_dir / TRAIN_FILE[task]

    def edits_file(self, task: str) -> Path:
        return self.data_dir / f"edits_{task}.jsonl"

    def corrupted(self, task: str) -> Path:
        return self.adapters / CORRUPTED[task]

    def retrained(self, task: str) -> Path:
        return self.adapters / RETRAINED[task]

    def retrain_seconds(self, task: str) -> float:
        return self.timings[RETRAINED[task]]

    def eval_sets(self, task: str, held_out: str = "test") -> dict[str, tuple[list[Sample], list[int]]]:
        """The held-out split and the edited samples: IR's removed pairs as trained (wrong answers), else the
        corrected pairs with their true answers."""
        held = {held_out: self.test if held_out == "test" else self.validation}
        if task == "ir":
            ids = set(self.bad_ids)
            return {**held, "forget": ([s for s in self.corrupted_rc if s.id in ids],
                                       [self.wrong_label[k] for k in self.bad])}
        return {**held, "edited": ([self.clean[k] for k in self.bad], self.edited_truth)}


TRAIN_FILE = {"rc": "train_rc.json", "ir": "train_rc.json", "qm": "train_qm.json"}
CORRUPTED = {"rc": "corrupted-labels", "ir": "corrupted-labels", "qm": "corrupted-images"}
RETRAINED = {"rc": "retrained-clean", "qm": "retrained-clean", "ir": "retrained-removed"}


def build_scenarios(root: Path, cfg: DemoConfig) -> Scenarios:
    """Pre-train the base, write the data and edits files, train the corrupted and retrained adapters."""
    pre_idx, train_idx, test_idx = _split(cfg)
    images, targets = digit_images()
    rng = random.Random(cfg.seed + 1)
    n_bad = max(1, round(cfg.corruption * len(train_idx)))
    bad = sorted(rng.sample(range(len(train_idx)), n_bad))
    wrong_label = {k: (targets[train_idx[k]] + rng.randint(1, 9)) % 10 for k in bad}
    # QM: a corrupted pair shows another digit's image (taken from the pre-training pool) under the right answer
    by_class: dict[int, list[int]] = {}
    for i in pre_idx:
        by_class.setdefault(targets[i], []).append(i)
    wrong_image = {k: rng.choice(by_class[wrong_label[k]]) for k in bad}

    base = _pretrain_base(root / "base", digit_samples(pre_idx, prefix="pre-"), cfg)

    data_dir = root / "data"
    clean = digit_samples(train_idx)
    test = (digit_samples(test_idx, prefix="test-"), [targets[i] for i in test_idx])
    val_idx = _validation_split(cfg)
    validation = (digit_samples(val_idx, prefix="val-"), [targets[i] for i in val_idx])
    # image files, so that datasets and edits are real files a user can replay with the CLI
    img_dir = data_dir / "images"
    img_dir.mkdir(parents=True)
    for s, i in zip(clean, train_idx):
        s.image.save(img_dir / f"{s.id}.png")
    files = {s.id: img_dir / f"{s.id}.png" for s in clean}
    clean = [dataclasses.replace(s, image=None, image_path=files[s.id]) for s in clean]
    for k in bad:
        images[wrong_image[k]].save(img_dir / f"wrong-{clean[k].id}.png")

    corrupted_rc = [modify_sample(s, response=DIGIT_WORDS[wrong_label[k]]) if k in wrong_label else s
                    for k, s in enumerate(clean)]
    corrupted_qm = [modify_sample(s, image=img_dir / f"wrong-{s.id}.png") if k in wrong_label else s
                    for k, s in enumerate(clean)]
    save_dataset(corrupted_rc, data_dir / "train_rc.json")
    save_dataset(corrupted_qm, data_dir / "train_qm.json")
    save_dataset(clean, data_dir / "train_clean.json")
    kept = [s for k, s in enumerate(clean) if k not in wrong_label]
    save_dataset(kept, data_dir / "train_removed.json")
    bad_ids = [clean[k].id for k in bad]
    _write_edits(data_dir / "edits_rc.jsonl",
                 [{"op": "correct", "id": i, "response": DIGIT_WORDS[targets[train_idx[k]]]}
                  for i, k in zip(bad_ids, bad)])
    _write_edits(data_dir / "edits_qm.jsonl",
                 [{"op": "modify", "id": i, "image": f"images/{i}.png"} for i in bad_ids])
    _write_edits(data_dir / "edits_ir.jsonl", [{"op": "remove", "id": i} for i in bad_ids])

    adapters = root / "adapters"
    timings: dict[str, float] = {}
    need = set(cfg.tasks)
    to_train = {CORRUPTED[t]: TRAIN_FILE[t] for t in need}
    to_train.update({RETRAINED[t]: "train_removed.json" if t == "ir" else "train_clean.json" for t in need})
    for name, fname in to_train.items():
        timings[name] = _train_adapter(base, load_dataset(data_dir / fname), adapters / name, cfg)
    return Scenarios(root, base, data_dir, adapters, clean, corrupted_rc, bad, bad_ids, wrong_label,
                     [targets[train_idx[k]] for k in bad], test, validation,
                     {"pretrain": len(pre_idx), "train": len(train_idx), "test": len(test_idx),
                      "validation": len(val_idx), "edits": len(bad)}, timings)


def _validation_split(cfg: DemoConfig) -> list[int]:
    """The digits after the demo's three splits (same shuffle): never trained on, never tested."""
    order = list(range(len(digit_images()[0])))
    random.Random(cfg.seed).shuffle(order)
    start = cfg.n_pretrain + cfg.n_train + cfg.n_test
    return order[start:start + cfg.n_validation]


def demo_solver(cfg: DemoConfig) -> SolverConfig:
    """The solver settings every demo scenario uses."""
    return cfg.solver


def _run(root: Path, cfg: DemoConfig) -> dict[str, Any]:
    sc_files = build_scenarios(root, cfg)
    solver = demo_solver(cfg)
    scenarios: dict[str, Any] = {}
    for task in cfg.tasks:
        outcome = run_unlearn(str(sc_files.base), sc_files.corrupted(task), sc_files.train_file(task),
                              sc_files.edits_file(task), sc_files.adapters / f"unlearned-{task}", solver=solver,
                              options=cfg.load_options())
        sets = sc_files.eval_sets(task)
        rows = {role: evaluate_adapter(sc_files.base, path, sets, cfg) for role, path in
                (("corrupted", sc_files.corrupted(task)), ("retrained", sc_files.retrained(task)),
                 ("mmerase", outcome.out))}
        res = outcome.result
        sc: dict[str, Any] = {
            "name": TASK_NAMES[task], "n_edits": len(sc_files.bad), "rows": rows,
            "retrain_seconds": sc_files.retrain_seconds(task),
            "unlearn_seconds": outcome.record["timings"]["solve_s"],
            "damping": res.config.get("damping"), "damping_estimate": res.info.get("damping"),
            "residual": res.residual, "converged": res.converged, "solver_steps": res.steps,
            "stationarity_gap": res.info.get("stationarity_gap"),
            "residual_history": [(h["step"], h["residual"]) for h in res.history],
            **recoveries(task, rows),
        }
        scenarios[task] = sc
    return {"config": asdict(cfg), "solver": solver.to_dict(), "scenarios": scenarios, "sizes": sc_files.sizes,
            "versions": versions(), "machine": machine()}


def recoveries(task: str, rows: dict[str, dict[str, float]], held_out: str = "test") -> dict[str, float | None]:
    """Recovery ratios (unlearned − corrupted)/(retrained − corrupted) of a scenario's evaluation rows."""
    c, r, u = rows["corrupted"], rows["retrained"], rows["mmerase"]
    out = {f"recovery_{held_out}_acc": recovery_ratio(u[f"{held_out}_acc"], c[f"{held_out}_acc"], r[f"{held_out}_acc"])}
    if task == "ir":
        out["forget_loss_rel_diff"] = abs(u["forget_loss"] - r["forget_loss"]) / abs(r["forget_loss"])
        out["recovery_forget_loss"] = recovery_ratio(u["forget_loss"], c["forget_loss"], r["forget_loss"])
    else:
        out["recovery_edited_acc"] = recovery_ratio(u["edited_acc"], c["edited_acc"], r["edited_acc"])
        out["recovery_edited_loss"] = recovery_ratio(u["edited_loss"], c["edited_loss"], r["edited_loss"])
    return out


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _damping_text(solver: dict[str, Any]) -> str:
    if solver["damping"] == "auto":
        return f"auto ({solver['damping_scale']:g} × the curvature's top eigenvalue)"
    return f"{solver['damping']:g}"


def _markdown(report: dict[str, Any]) -> str:
    s = report["sizes"]
    lines = [
        "# mmerase demo: unlearning corrupted image-text pairs (tiny LLaVA, scikit-learn digits)", "",
        f"{s['train']} training pairs, {s['edits']} corrupted ({100 * report['config']['corruption']:.0f}%), "
        f"{s['test']} held-out digits; base pre-trained on {s['pretrain']} other digits. "
        f"Solver: {report['solver']['method']}, curvature {report['solver']['curvature']}, "
        f"damping {_damping_text(report['solver'])}, refinement steps {report['solver']['refine_steps']}"
        + (f" ({report['solver'].get('refine_damping')}-damped)" if report['solver']['refine_steps'] else "") + ".", "",
    ]
    for task, sc in report["scenarios"].items():
        rows = sc["rows"]
        edited = "forget" if task == "ir" else "edited"
        lines += [f"## {task.upper()}: {sc['name']} ({sc['n_edits']} edits)", "",
                  f"| adapter | test accuracy | {edited}-set accuracy | {edited}-set loss |", "|---|---|---|---|"]
        for role in ("retrained", "corrupted", "mmerase"):
            r = rows[role]
            lines.append(f"| {role} | {_fmt(r['test_acc'], True)} | {_fmt(r[f'{edited}_acc'], True)} | "
                         f"{_fmt(r[f'{edited}_loss'])} |")
        lines += ["", f"- recovery of the test-accuracy gap: {_fmt(sc['recovery_test_acc'])}"]
        if task == "ir":
            lines.append(f"- forget-set loss vs retrained: {100 * sc['forget_loss_rel_diff']:.1f}% apart "
                         f"(recovery of the loss gap {_fmt(sc['recovery_forget_loss'])})")
        else:
            lines.append(f"- recovery of the edited-set accuracy gap: {_fmt(sc['recovery_edited_acc'])}, "
                         f"of the edited-set loss gap: {_fmt(sc['recovery_edited_loss'])}")
        lines += [f"- damping λ = {sc['damping']:.3g}" + (f" ({sc['damping_estimate']['rule']}, top eigenvalue "
                                                         f"{sc['damping_estimate']['top_eigenvalue']:.3g})"
                                                         if sc.get("damping_estimate") else ""),
                  f"- time: retrain {sc['retrain_seconds']:.1f} s, unlearn {sc['unlearn_seconds']:.1f} s; final "
                  f"residual {sc['residual']:.1e} after {sc['solver_steps']} steps, stationarity gap "
                  f"{_fmt(sc['stationarity_gap'])}", ""]
    m = report["machine"]
    lines += [f"Machine: {m['cpu']} ({m['cores']} cores); torch {report['versions']['torch']}, transformers "
              f"{report['versions']['transformers']}, peft {report['versions']['peft']}; seed "
              f"{report['config']['seed']}; total {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["scenarios"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for t in tasks:
        hist = report["scenarios"][t]["residual_history"]
        ax1.semilogy([h[0] for h in hist], [max(h[1], 1e-16) for h in hist], marker="o", ms=3, label=t.upper())
    ax1.set_xlabel("solver step")
    ax1.set_ylabel("relative residual ‖(H+λI)δ − b‖/‖b‖")
    ax1.set_title("solver convergence")
    ax1.legend()
    width = 0.25
    for j, role in enumerate(("retrained", "corrupted", "mmerase")):
        vals = [100 * report["scenarios"][t]["rows"][role]["test_acc"] for t in tasks]
        ax2.bar([i + (j - 1) * width for i in range(len(tasks))], vals, width, label=role)
    ax2.set_xticks(range(len(tasks)), [t.upper() for t in tasks])
    ax2.set_ylabel("held-out accuracy (%)")
    ax2.set_title("test accuracy")
    ax2.legend()
    lo = min(100 * report["scenarios"][t]["rows"][r]["test_acc"] for t in tasks
             for r in ("retrained", "corrupted", "mmerase"))
    ax2.set_ylim(max(0, lo - 10), 100)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
