"""The digits unlearning scenarios that the demo and the benchmarks share.

A tiny LLaVA preset first gets a base competence (full training on a split the adapter never sees). A LoRA adapter is
then fine-tuned on "<image> What digit is this?" → "seven" pairs of which a fraction is corrupted, giving three
scenarios, each with its corrupted adapter, an adapter retrained from scratch on the edited data, and real files (data,
edits, images) that the command line can replay:

- **rc** (response correction): corrupted answers are corrected;
- **qm** (query modification): corrupted images (a different digit) are replaced by the right image;
- **ir** (instance removal): the corrupted pairs are removed.

Held-out digits are split into a test split (reported) and a validation split (for choosing settings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import DIGIT_WORDS, Sample, digit_images, digit_samples, load_dataset, modify_sample, save_dataset
from .metrics import recovery_ratio
from .models import LoadOptions, LoraSettings, load_model
from .models.presets import build_preset
from .options import option
from .training import TrainConfig, finetune, train

TASK_NAMES = {"rc": "response correction", "qm": "query (image) modification", "ir": "instance removal"}


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """One line on stderr when a long stage starts and one with its time when it ends (readable in a log file,
    under nohup or in CI, where progress bars are off)."""
    print(f"[mmerase] {what} …", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"[mmerase] {what}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def parse_tasks(text: str) -> tuple[str, ...]:
    """'all', one scenario, or a comma-separated list of scenarios."""
    names = tuple(TASK_NAMES) if text == "all" else tuple(t.strip() for t in str(text).split(",") if t.strip())
    bad = [t for t in names if t not in TASK_NAMES]
    if bad or not names:
        raise ValueError(text)
    return names


parse_tasks.__name__ = "scenario (rc, qm, ir, all, or a comma-separated list)"



@dataclass
class ScenarioConfig:
    """The digits scenarios' sizes and recipes; ``quick`` shrinks everything for tests."""

    tasks: tuple[str, ...] = option(tuple(TASK_NAMES), flag="--task", parse=parse_tasks, help=(
        "scenario: rc (correct answers), qm (replace images), ir (remove), all, or a comma-separated list"))
    seed: int = option(0, help="seed of the data split, corruption, training and solver")
    quick: bool = option(False, help="reduced sizes (for tests)")
    corruption: float = option(0.2, help="fraction of training pairs corrupted")
    device: str | None = option(None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    progress: bool | None = option(None, help="progress bars (default: only on a terminal)")
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

    def load_options(self) -> LoadOptions:
        """How the scenarios load every model (their device; float32)."""
        return LoadOptions(device=self.device)


def digit_split(cfg: ScenarioConfig) -> tuple[list[int], list[int], list[int]]:
    images, _ = digit_images()
    order = list(range(len(images)))
    random.Random(cfg.seed).shuffle(order)
    need = cfg.n_pretrain + cfg.n_train + cfg.n_test
    if need > len(order):
        raise ValueError(f"the scenarios need {need} digits; scikit-learn ships {len(order)}")
    a, b = cfg.n_pretrain, cfg.n_pretrain + cfg.n_train
    return order[:a], order[a:b], order[b:need]


def pretrain_base(folder: Path, pretrain: list[Sample], cfg: ScenarioConfig, preset_name: str = "tiny-llava"
                  ) -> Path:
    """Build a tiny preset and train all its weights on the pre-training split (base competence)."""
    preset = build_preset(preset_name, folder, seed=cfg.seed)
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


def train_scenario_adapter(base: Path, samples: list[Sample], out: Path, cfg: ScenarioConfig) -> float:
    """A LoRA adapter trained from its seeded initialisation with the scenarios' recipe; returns the seconds."""
    bundle = load_model(base, lora=LoraSettings(r=cfg.lora_r, alpha=2.0 * cfg.lora_r, seed=cfg.seed),
                        options=cfg.load_options())
    res = finetune(bundle, samples, TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                                schedule="cosine", seed=cfg.seed, progress=cfg.progress), out)
    return res.seconds


def evaluate_adapter(base: Path, adapter: Path, sets: dict[str, tuple[list[Sample], list[int]]], cfg: ScenarioConfig
                     ) -> dict[str, float]:
    """Accuracy of greedy answers and mean loss L(z) on each named sample set, for an adapter on disk."""
    return evaluate_bundle(load_model(base, adapter=adapter, options=cfg.load_options()), sets, cfg.progress)


def evaluate_bundle(bundle: Any, sets: dict[str, tuple[list[Sample], list[int | str]]],
                    progress: bool | None = None) -> dict[str, float]:
    """Accuracy of greedy answers and mean loss L(z) on each named sample set, for a loaded model. The expected
    answers are strings, or digit classes (their word)."""
    out: dict[str, float] = {}
    for name, (samples, labels) in sets.items():
        if not samples:
            continue
        expected = [DIGIT_WORDS[y] if isinstance(y, int) else y for y in labels]
        answers = bundle.generate(samples, max_new_tokens=max(8, 2 + max(len(e) for e in expected)), batch_size=64,
                                  progress=progress)
        out[f"{name}_acc"] = sum(a == e for a, e in zip(answers, expected)) / len(labels)
        out[f"{name}_loss"] = float(bundle.per_sample_losses(samples, batch_size=64).mean())
    return out


def write_edits(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")


@dataclass
class Scenarios:
    """Everything the scenarios share, on disk: the base, data and edits files, the corrupted and retrained
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
    wrong_label: dict[int, int | str]
    edited_truth: list[int | str]
    test: tuple[list[Sample], list[int | str]]
    validation: tuple[list[Sample], list[int | str]]
    sizes: dict[str, int]
    timings: dict[str, float]
    cpu_timings: dict[str, float] = dataclasses.field(default_factory=dict)

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

    def retrain_passes(self, task: str, epochs: int) -> int:
        """One retraining's sample passes: ``epochs`` × the edited training set (IR's has the removed pairs out)."""
        return epochs * (self.sizes["train"] - (self.sizes["edits"] if task == "ir" else 0))

    def retrain_cpu_seconds(self, task: str) -> float | None:
        """The retraining's CPU time (this process), for comparing with the unlearning's accounting."""
        return self.cpu_timings.get(RETRAINED[task])

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


def build_scenarios(root: Path, cfg: ScenarioConfig, extra_train: Sequence[Sample] = ()) -> Scenarios:
    """Pre-train the base, write the data and edits files, train the corrupted and retrained adapters.

    ``extra_train``: clean image-text samples (in-memory images, ids unique) appended to the training set after the
    digits of the split. They are never corrupted, so the edits stay the same while the training set grows (how
    the benchmarks measure a fixed request against larger fine-tunes)."""
    pre_idx, train_idx, test_idx = digit_split(cfg)
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

    with stage(f"pre-training the tiny LLaVA base on {len(pre_idx)} digits"):
        base = pretrain_base(root / "base", digit_samples(pre_idx, prefix="pre-"), cfg)

    data_dir = root / "data"
    clean = digit_samples(train_idx) + list(extra_train)
    test = (digit_samples(test_idx, prefix="test-"), [targets[i] for i in test_idx])
    val_idx = validation_split(cfg)
    validation = (digit_samples(val_idx, prefix="val-"), [targets[i] for i in val_idx])
    # image files, so that datasets and edits are real files a user can replay with the CLI
    img_dir = data_dir / "images"
    img_dir.mkdir(parents=True)
    for s in clean:
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
    write_edits(data_dir / "edits_rc.jsonl",
                 [{"op": "correct", "id": i, "response": DIGIT_WORDS[targets[train_idx[k]]]}
                  for i, k in zip(bad_ids, bad)])
    write_edits(data_dir / "edits_qm.jsonl",
                 [{"op": "modify", "id": i, "image": f"images/{i}.png"} for i in bad_ids])
    write_edits(data_dir / "edits_ir.jsonl", [{"op": "remove", "id": i} for i in bad_ids])

    adapters = root / "adapters"
    timings: dict[str, float] = {}
    need = set(cfg.tasks)
    to_train = {CORRUPTED[t]: TRAIN_FILE[t] for t in need}
    to_train.update({RETRAINED[t]: "train_removed.json" if t == "ir" else "train_clean.json" for t in need})
    cpu: dict[str, float] = {}
    for name, fname in to_train.items():
        with stage(f"training the {name} adapter"):
            t_cpu = time.process_time()
            timings[name] = train_scenario_adapter(base, load_dataset(data_dir / fname), adapters / name, cfg)
            cpu[name] = time.process_time() - t_cpu
    return Scenarios(root, base, data_dir, adapters, clean, corrupted_rc, bad, bad_ids, wrong_label,
                     [targets[train_idx[k]] for k in bad], test, validation,
                     {"pretrain": len(pre_idx), "train": len(clean), "test": len(test_idx),
                      "validation": len(val_idx), "edits": len(bad)}, timings, cpu)


def validation_split(cfg: ScenarioConfig) -> list[int]:
    """The digits after the demo's three splits (same shuffle): never trained on, never tested."""
    order = list(range(len(digit_images()[0])))
    random.Random(cfg.seed).shuffle(order)
    start = cfg.n_pretrain + cfg.n_train + cfg.n_test
    return order[start:start + cfg.n_validation]


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


# ----------------------------------------------------------------------------- a text-only scenario
SPELL_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def spell(number: int) -> str:
    """``spell(472)`` = "four seven two": the answer of the text scenario."""
    return " ".join(SPELL_WORDS[int(c)] for c in f"{number:03d}")


def spell_sample(number: int, answer: str | None = None) -> Sample:
    """"Spell 472" → "four seven two" (or ``answer``), id ``n472``."""
    return Sample(f"n{number:03d}", [{"from": "human", "value": f"Spell {number:03d}"},
                                     {"from": "gpt", "value": spell(number) if answer is None else answer}])


@dataclass
class SpellConfig(ScenarioConfig):
    """The text-only scenario's sizes and recipe: a tiny Llama spells three-digit numbers digit by digit, which
    generalises to numbers it never saw; the base is pre-trained on a few, the adapter fine-tuned on more."""

    tasks: tuple[str, ...] = ("rc", "ir")
    n_pretrain: int = 200
    n_train: int = 250
    n_test: int = 250
    n_validation: int = 250
    pretrain_epochs: int = 6
    pretrain_lr: float = 3e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if "qm" in self.tasks:
            raise ValueError("the text scenario has no images to modify: its tasks are rc and ir")
        if self.quick:
            self.n_pretrain, self.n_train, self.n_test, self.n_validation = 120, 80, 40, 40


def build_spell_scenarios(root: Path, cfg: SpellConfig) -> Scenarios:
    """The text-only scenarios (rc: corrected spellings, ir: removed pairs), laid out like the digits ones."""
    numbers = list(range(1000))
    random.Random(cfg.seed).shuffle(numbers)
    sizes = [cfg.n_pretrain, cfg.n_train, cfg.n_test, cfg.n_validation]
    cuts = [sum(sizes[:i]) for i in range(5)]
    pre, train_n, test_n, val_n = (numbers[cuts[i]:cuts[i + 1]] for i in range(4))
    rng = random.Random(cfg.seed + 1)
    bad = sorted(rng.sample(range(len(train_n)), max(1, round(cfg.corruption * len(train_n)))))
    wrong = {k: spell(rng.choice([m for m in range(1000) if m != train_n[k]])) for k in bad}
    with stage(f"pre-training the tiny Llama base on {len(pre)} numbers"):
        base = pretrain_base(root / "base", [spell_sample(m) for m in pre], cfg, preset_name="tiny-llama")
    clean = [spell_sample(m) for m in train_n]
    corrupted = [modify_sample(s, response=wrong[k]) if k in wrong else s for k, s in enumerate(clean)]
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    save_dataset(corrupted, data_dir / "train_rc.json")
    save_dataset(clean, data_dir / "train_clean.json")
    save_dataset([s for k, s in enumerate(clean) if k not in wrong], data_dir / "train_removed.json")
    bad_ids = [clean[k].id for k in bad]
    write_edits(data_dir / "edits_rc.jsonl", [{"op": "correct", "id": clean[k].id, "response": clean[k].response}
                                             for k in bad])
    write_edits(data_dir / "edits_ir.jsonl", [{"op": "remove", "id": i} for i in bad_ids])
    adapters, timings = root / "adapters", {}
    for name, fname in (("corrupted-labels", "train_rc.json"), ("retrained-clean", "train_clean.json"),
                        ("retrained-removed", "train_removed.json")):
        with stage(f"training the {name} adapter"):
            timings[name] = train_scenario_adapter(base, load_dataset(data_dir / fname), adapters / name, cfg)
    held = {name: ([spell_sample(m) for m in nums], [spell(m) for m in nums]) for name, nums in
            (("test", test_n), ("validation", val_n))}
    return Scenarios(root, base, data_dir, adapters, clean, corrupted, bad, bad_ids, wrong,
                     [clean[k].response for k in bad], held["test"], held["validation"],
                     {"pretrain": len(pre), "train": len(train_n), "test": len(test_n), "validation": len(val_n),
                      "edits": len(bad)}, timings)
