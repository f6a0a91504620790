"""``mmerase eval unlearning`` on the demo's scenarios: corrupted / retrained / unlearned adapters side by side.

Takes a finished ``mmerase demo`` folder, writes the evaluation splits into it (``<demo>/eval_splits/``):

- ``forget_<task>.json``: the corrupted pairs as the corrupted adapter was trained on them (RC and IR: the wrong
  answers of ``train_rc.json``; QM: the wrong images of ``train_qm.json``), i.e. the members to be forgotten;
- ``test.json``: the demo's held-out test digits (neither pre-trained nor fine-tuned on), rebuilt from the demo's
  configuration with the demo's split rule and checked against the training ids its data folder holds;

then runs ``mmerase eval unlearning`` once per scenario (the exact command lines are written to the report) into
``<out>/<task>/`` and writes ``<out>.md`` with the commands and each scenario's table.

    mmerase demo --out /tmp/mmerase-demo
    python benchmarks/eval_unlearning_demo.py --demo /tmp/mmerase-demo
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_test_indices(demo: Path) -> list[int]:
    """The demo's test digits: its configuration's sizes and seed through the scenarios' own split rule
    (:func:`mmerase.scenarios.digit_split`), checked against the training ids in ``data/train_clean.json``."""
    from mmerase.data import load_dataset
    from mmerase.scenarios import ScenarioConfig, digit_split

    cfg = json.loads((demo / "report.json").read_text())["config"]
    sizes = ScenarioConfig(seed=cfg["seed"], n_pretrain=cfg["n_pretrain"], n_train=cfg["n_train"],
                           n_test=cfg["n_test"])
    _, train_idx, test_idx = digit_split(sizes)
    train_ids = [s.id for s in load_dataset(demo / "data" / "train_clean.json")]
    if train_ids != [f"digit-{i}" for i in train_idx]:
        raise SystemExit(f"{demo}: the training ids do not follow the demo's split rule; cannot rebuild its test set")
    return test_idx


def write_splits(demo: Path, tasks: list[str]) -> dict[str, Path]:
    """``{"test": file, "forget_<task>": file}`` in ``<demo>/eval_splits``."""
    from mmerase.data import load_dataset, save_dataset, write_digits_dataset
    from mmerase.scenarios import TRAIN_FILE

    folder = demo / "eval_splits"
    folder.mkdir(exist_ok=True)
    files = {"test": write_digits_dataset(folder, demo_test_indices(demo), filename="test.json")}
    bad = {json.loads(line)["id"] for line in (demo / "data" / "edits_ir.jsonl").read_text().splitlines() if line}
    for task in tasks:
        trained = load_dataset(demo / "data" / TRAIN_FILE[task])
        files[f"forget_{task}"] = save_dataset([s for s in trained if s.id in bad], folder / f"forget_{task}.json")
    return files


def command(demo: Path, task: str, splits: dict[str, Path], out: Path, max_new_tokens: int) -> list[str]:
    from mmerase.scenarios import CORRUPTED, RETRAINED

    ad = demo / "adapters"
    return ["python", "-m", "mmerase", "eval", "unlearning", "--base", str(demo / "base"),
            "--adapters", f"corrupted={ad / CORRUPTED[task]}", f"retrained={ad / RETRAINED[task]}",
            f"unlearned={ad / f'unlearned-{task}'}",
            "--splits", f"forget={splits[f'forget_{task}']}", f"test={splits['test']}",
            "--corrupted", "corrupted", "--retrained", "retrained", "--max-new-tokens", str(max_new_tokens),
            "--device", "cpu", "--out", str(out / task)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, required=True, help="a finished `mmerase demo` output folder")
    p.add_argument("--out", type=Path, default=Path("benchmarks/eval_unlearning_demo"),
                   help="output folder, relative to the repository")
    p.add_argument("--tasks", nargs="+", default=["rc", "qm", "ir"], choices=["rc", "qm", "ir"])
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length (the demo's own evaluation uses 8)")
    args = p.parse_args()
    splits = write_splits(args.demo, args.tasks)
    cfg = json.loads((args.demo / "report.json").read_text())["config"]
    lines = ["# `mmerase eval unlearning` on the demo's scenarios", "",
             f"Demo folder made by `mmerase demo{' --quick' if cfg['quick'] else ''} --out {args.demo}` "
             f"(its defaults: {cfg['preparation'] or 'no'} preparation, {cfg['solver']['refine_steps']} refinement "
             f"steps; seed {cfg['seed']}; {cfg['n_train']} training pairs, "
             f"{round(cfg['corruption'] * cfg['n_train'])} corrupted, {cfg['n_test']} held-out test digits). "
             "Forget split = the corrupted pairs as trained; held-out = the demo's test digits. Splits written by",
             "", "```bash", f"PYTHONPATH=$PWD python benchmarks/eval_unlearning_demo.py --demo {args.demo}", "```", ""]
    for task in args.tasks:
        cmd = command(args.demo, task, splits, args.out, args.max_new_tokens)
        print("+", shlex.join(cmd), flush=True)
        subprocess.run([sys.executable, *cmd[1:]], check=True, cwd=REPO)
        table = (REPO / args.out / task / "unlearning_summary.md").read_text()
        lines += [f"## {task.upper()}", "", "```bash", "PYTHONPATH=$PWD " + shlex.join(cmd), "```", "",
                  table.split("\n\n", 1)[1].split("\n## ")[0].strip(), "",
                  f"![{task}]({args.out.name}/{task}/unlearning_summary.png)", ""]
    lines += ["Each folder also gets the per-sample files (`unlearning_samples.jsonl`, `records_*.jsonl`, which "
              "`--records` takes to rebuild the table without the models); they are not committed.", ""]
    report = REPO / args.out.with_suffix(".md")
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
