"""GPU smoke check: the command line end to end on one CUDA device, in one process, in a few minutes.

    python benchmarks/gpu_smoke.py [--device cuda] [--out gpu-smoke] [--cases NAME,...]

On the tiny-llava and tiny-llama presets it runs, through ``mmerase.cli.main`` exactly as a user would:
finetune → unlearn with every solver (cg, stochastic, lissa, dense on a LoRA small enough for it, prepared), every
curvature, damping auto and fixed, two refinement steps of each mode, ``prepare`` of every kind and
``unlearn --prepared``, every other unlearning method (``--method finetune / ga / graddiff / npo / kl / surrogate``),
``generate``, ``eval unlearning``, an NF4 (4-bit) base, and ``mmerase demo --quick``. On each other family's tiny
preset (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL): finetune → unlearn (remove, correct, modify
with a new image of another size) → generate, on images of several sizes in both data formats.
The default unlearning (and a few other cases, every family's included) also runs on the CPU from the same files:
the two adapters' δ must agree (float64 on both; random draws come from CPU generators, so both devices see the
same mini-batches).

Each case records ok / failed (with the error's last line) and seconds; the summary goes to ``OUT/gpu_smoke.json``
and ``OUT/gpu_smoke.md`` with the card and package versions, and the exit status is 1 when any case failed.

The GPU machine may lack bitsandbytes (NF4) and deepspeed and have no network. Bring the wheels along:
on a machine with network, ``pip download bitsandbytes deepspeed --only-binary=:all: --no-deps -d wheels/``
(for the GPU machine's Python version and platform: add ``--python-version 3.11 --platform manylinux_2_24_x86_64``
when they differ), copy ``wheels/`` over, then ``pip install --no-deps wheels/*.whl``. Without bitsandbytes the
NF4 case is reported as skipped with that reason (never as passed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: δ on the card vs δ on the CPU (float64 on both): relative difference allowed
DELTA_TOL = 1e-6
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: the vision-language families beside LLaVA-1.5, by tiny preset
FAMILIES = ("tiny-llava-next", "tiny-llava-onevision", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl")
#: (width, height) of the family data's images: every family sees images of different sizes in one batch
SIZES = [(28, 28), (56, 28), (28, 48), (40, 40), (36, 56), (48, 32)]


def _write_data(root: Path) -> dict[str, Path]:
    """Small text and image data sets, their edits files and a held-out split."""
    from mmerase.data import digit_samples, save_dataset

    root.mkdir(parents=True, exist_ok=True)
    text = [{"id": f"q{i}", "conversations": [{"from": "human", "value": f"Spell {i}"},
                                              {"from": "gpt", "value": WORDS[i % 10]}]} for i in range(24)]
    (root / "text.json").write_text(json.dumps(text), encoding="utf-8")
    held = [{"id": f"h{i}", "conversations": [{"from": "human", "value": f"Spell {i + 30}"},
                                              {"from": "gpt", "value": WORDS[i % 10]}]} for i in range(8)]
    (root / "text_test.json").write_text(json.dumps(held), encoding="utf-8")
    (root / "text_forget.json").write_text(json.dumps(text[:3]), encoding="utf-8")
    edits = [{"op": "remove", "id": "q0"}, {"op": "correct", "id": "q1", "response": "uno"},
             {"op": "modify", "id": "q2", "query": "Spell two, please"}]
    (root / "text_edits.jsonl").write_text("".join(json.dumps(e) + "\n" for e in edits), encoding="utf-8")
    retrain = [dict(r, conversations=[r["conversations"][0], {"from": "gpt", "value": "uno"}]) if r["id"] == "q1" else
               dict(r, conversations=[{"from": "human", "value": "Spell two, please"}, r["conversations"][1]])
               if r["id"] == "q2" else r for r in text[1:]]  # the edits applied: what retraining trains on
    (root / "text_retrain.json").write_text(json.dumps(retrain), encoding="utf-8")
    images = []
    (root / "images").mkdir(exist_ok=True)
    for sample in digit_samples(range(24)):  # records point at image files, as a user's data set does
        sample.image.save(root / "images" / f"{sample.id}.png")
        images.append(dataclasses.replace(sample, image=None, image_path=root / "images" / f"{sample.id}.png"))
    save_dataset(images, root / "digits.json")
    img_edits = [{"op": "remove", "id": images[0].id},
                 {"op": "correct", "id": images[1].id, "response": "nine"}]
    (root / "digits_edits.jsonl").write_text("".join(json.dumps(e) + "\n" for e in img_edits), encoding="utf-8")
    return {"text": root / "text.json", "text_edits": root / "text_edits.jsonl", "text_test": root / "text_test.json",
            "text_forget": root / "text_forget.json", "text_retrain": root / "text_retrain.json", "digits": root / "digits.json",
            "digits_edits": root / "digits_edits.jsonl", **_write_family_data(root / "family")}


def _write_family_data(root: Path) -> dict[str, Path]:
    """Digit images of six sizes in LLaVA ``conversations`` and ``messages`` records, and edits whose modify brings
    a new image of another size (the number of vision tokens changes)."""
    from PIL import Image

    from mmerase.data import digit_images

    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    images, labels = digit_images(16, 13)
    for i, (image, label) in enumerate(zip(images[:12], labels)):
        name, size = f"img/{i}.png", SIZES[i % len(SIZES)]
        image.resize(size, Image.NEAREST).save(root / name)
        rows.append({"id": f"d{i}", "messages": [
            {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": "What digit?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": WORDS[label]}]}]} if i % 2 else
            {"id": f"d{i}", "image": name, "conversations": [{"from": "human", "value": "<image>\nWhat digit?"},
                                                            {"from": "gpt", "value": WORDS[label]}]})
    images[12].resize((56, 44), Image.NEAREST).save(root / "img" / "new.png")  # d3's image is 40×40
    (root / "train.json").write_text(json.dumps(rows), encoding="utf-8")
    edits = [{"op": "remove", "id": "d1"}, {"op": "correct", "id": "d2", "response": "nine"},
             {"op": "modify", "id": "d3", "image": "img/new.png"}]
    (root / "edits.jsonl").write_text("".join(json.dumps(e) + "\n" for e in edits), encoding="utf-8")
    return {"family": root / "train.json", "family_edits": root / "edits.jsonl"}


class Smoke:
    """Runs the cases, keeps their outcomes."""

    def __init__(self, out: Path, device: str, only: list[str] | None) -> None:
        self.out, self.device, self.only = out, device, only
        self.work = out / "work"
        self.rows: list[dict[str, Any]] = []

    def cli(self, *args: Any) -> None:
        from mmerase.cli import main

        code = main([str(a) for a in args])
        if code != 0:
            raise RuntimeError(f"`mmerase {' '.join(map(str, args[:2]))} …` exited with status {code}")

    def case(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        if self.only is not None and not any(name.startswith(prefix) for prefix in self.only):
            return
        t0 = time.perf_counter()
        row: dict[str, Any] = {"case": name}
        try:
            row.update(fn() or {})
            row.setdefault("status", "ok")
        except Exception as e:  # a failed case is reported, the others still run
            row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       traceback=traceback.format_exc(limit=6))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[gpu-smoke] {row['status']:>7}  {name}  ({row['seconds']} s)"
              + (f"  {row.get('error', row.get('note', ''))}" if row["status"] != "ok" or row.get("note") else ""),
              flush=True)
        self.rows.append(row)


def _delta(before: Path, after: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    a, b = load_file(str(before / "adapter_model.safetensors")), load_file(str(after / "adapter_model.safetensors"))
    return {k: b[k].double() - a[k].double() for k in a}


def compare_deltas(base_adapter: Path, on_card: Path, on_cpu: Path) -> dict[str, Any]:
    """‖δ_card − δ_cpu‖ / ‖δ_cpu‖ of two unlearned adapters made from the same input adapter."""
    d_card, d_cpu = _delta(base_adapter, on_card), _delta(base_adapter, on_cpu)
    num = sum(float((d_card[k] - d_cpu[k]).square().sum()) for k in d_cpu) ** 0.5
    den = sum(float(d_cpu[k].square().sum()) for k in d_cpu) ** 0.5
    rel = num / den if den else float("inf")
    if not rel <= DELTA_TOL:
        raise AssertionError(f"δ on the card differs from δ on the CPU by {rel:.2e} (allowed {DELTA_TOL:g})")
    return {"delta_rel_diff_vs_cpu": rel}


def _model_cases(s: Smoke, data: dict[str, Path], model: str) -> None:
    """finetune → unlearn (every solver, curvature, damping mode, refinement mode) → prepare → generate."""
    kind = "llava" if model == "tiny-llava" else "llama"
    train, edits = (data["digits"], data["digits_edits"]) if kind == "llava" else (data["text"], data["text_edits"])
    w, dev = s.work / kind, s.device
    common = ["--base", model, "--dtype", "float64", "--no-progress"]
    adapter, tiny = w / "adapter", w / "adapter-tiny"
    s.case(f"{kind}: finetune", lambda: s.cli("finetune", *common, "--device", dev, "--data", train, "--out", adapter,
                                              "--epochs", 2, "--lora-r", 4))
    s.case(f"{kind}: finetune tiny LoRA", lambda: s.cli(
        "finetune", *common, "--device", dev, "--data", train, "--out", tiny, "--epochs", 2, "--lora-r", 1,
        "--lora-targets", r".*layers\.1\.self_attn\.q_proj"))
    un = ["unlearn", *common, "--adapter", adapter, "--data", train, "--edits", edits, "--max-steps", 60]

    def default_on_both() -> dict[str, Any]:
        s.cli(*un, "--device", dev, "--out", w / "default")
        s.cli(*un, "--device", "cpu", "--out", w / "default-cpu")
        return compare_deltas(adapter, w / "default", w / "default-cpu")

    s.case(f"{kind}: unlearn (defaults: cg, hessian, damping auto), cuda = cpu", default_on_both)
    s.case(f"{kind}: cg fd-hessian, damping auto", lambda: s.cli(
        *un, "--device", dev, "--curvature", "fd-hessian", "--out", w / "cg-fd-hessian"))
    for curv in ("ggn", "fisher", "sampled-fisher"):  # PSD: a fixed λ is safe
        s.case(f"{kind}: cg {curv}, damping 0.5", lambda c=curv: s.cli(
            *un, "--device", dev, "--curvature", c, "--damping", 0.5, "--out", w / f"cg-{c}"))
    for solver in ("stochastic", "lissa"):
        s.case(f"{kind}: {solver} ggn, damping auto", lambda m=solver: s.cli(
            *un, "--device", dev, "--solver", m, "--curvature", "ggn", "--out", w / m))

    def dense_on_both() -> dict[str, Any]:
        args = ["unlearn", *common, "--adapter", tiny, "--data", train, "--edits", edits, "--solver", "dense"]
        s.cli(*args, "--device", dev, "--out", w / "dense")
        s.cli(*args, "--device", "cpu", "--out", w / "dense-cpu")
        return compare_deltas(tiny, w / "dense", w / "dense-cpu")

    s.case(f"{kind}: dense (tiny LoRA), cuda = cpu", dense_on_both)
    for mode in ("proximal", "step"):
        s.case(f"{kind}: 2 refinement steps, {mode}", lambda m=mode: s.cli(
            *un, "--device", dev, "--refine-steps", 2, "--refine-damping", m, "--out", w / f"refine-{m}"))
    _prepare_cases(s, common, adapter, train, edits, w, kind)
    _method_cases(s, common, adapter, train, edits, w, kind)
    s.case(f"{kind}: generate", lambda: s.cli("generate", *common, "--device", dev, "--adapter", adapter,
                                              "--data", train, "--out", w / "answers.jsonl", "--max-new-tokens", 4))


def _prepare_cases(s: Smoke, common: list, adapter: Path, train: Path, edits: Path, w: Path, kind: str) -> None:
    dev = s.device
    for k in ("lowrank", "ekfac", "kfac", "diagonal"):
        s.case(f"{kind}: prepare --kind {k}", lambda k=k: s.cli(
            "prepare", *common, "--device", dev, "--adapter", adapter, "--data", train, "--out", w / f"prep-{k}",
            "--kind", k, "--curvature", "ggn", "--rank", 8))
    un = ["unlearn", *common, "--adapter", adapter, "--data", train, "--edits", edits, "--curvature", "ggn"]

    def prepared_on_both() -> dict[str, Any]:
        s.cli(*un, "--device", dev, "--prepared", w / "prep-lowrank", "--out", w / "pcg")
        s.cli(*un, "--device", "cpu", "--prepared", w / "prep-lowrank", "--out", w / "pcg-cpu")
        return compare_deltas(adapter, w / "pcg", w / "pcg-cpu")

    s.case(f"{kind}: unlearn --prepared (lowrank PCG), cuda = cpu", prepared_on_both)
    for k in ("ekfac", "diagonal"):
        s.case(f"{kind}: unlearn --prepared ({k} PCG)", lambda k=k: s.cli(
            *un, "--device", dev, "--prepared", w / f"prep-{k}", "--out", w / f"pcg-{k}"))
    s.case(f"{kind}: unlearn --solver prepared", lambda: s.cli(
        *un, "--device", dev, "--solver", "prepared", "--prepared", w / "prep-lowrank", "--out", w / "one-step"))


def _method_cases(s: Smoke, common: list, adapter: Path, train: Path, edits: Path, w: Path, kind: str) -> None:
    """The other unlearning methods, each on a budget of 200 sample passes, about four retrainings of these tiny sets (the fine-tune: cuda = cpu)."""
    un = ["unlearn", *common, "--adapter", adapter, "--data", train, "--edits", edits, "--budget", 200]

    def finetune_on_both() -> dict[str, Any]:
        s.cli(*un, "--method", "finetune", "--device", s.device, "--out", w / "m-finetune")
        s.cli(*un, "--method", "finetune", "--device", "cpu", "--out", w / "m-finetune-cpu")
        return compare_deltas(adapter, w / "m-finetune", w / "m-finetune-cpu")

    s.case(f"{kind}: --method finetune, cuda = cpu", finetune_on_both)
    sur = ["unlearn", *common, "--adapter", adapter, "--data", train, "--edits", edits, "--method", "surrogate",
           "--surrogate-samples", 8, "--surrogate-prep-samples", 8, "--surrogate-steps", 2]

    def surrogate_on_both() -> dict[str, Any]:
        s.cli(*sur, "--device", s.device, "--out", w / "m-surrogate")
        s.cli(*sur, "--device", "cpu", "--out", w / "m-surrogate-cpu")
        return compare_deltas(adapter, w / "m-surrogate", w / "m-surrogate-cpu")

    s.case(f"{kind}: --method surrogate, cuda = cpu", surrogate_on_both)
    for method, extra in (("ga", []), ("graddiff", []), ("npo", ["--npo-retain"]), ("kl", [])):
        s.case(f"{kind}: --method {method}", lambda m=method, x=extra: s.cli(
            *un, "--method", m, *x, "--device", s.device, "--out", w / f"m-{m}"))


def _family_cases(s: Smoke, data: dict[str, Path]) -> None:
    """Each other vision-language family: finetune → unlearn (δ on the card = δ on the CPU) → generate."""
    for preset in FAMILIES:
        w = s.work / preset
        common = ["--base", preset, "--dtype", "float64", "--no-progress", "--data", data["family"]]
        un = ["unlearn", *common, "--adapter", w / "adapter", "--edits", data["family_edits"], "--max-steps", 60]

        def run(w=w, common=common, un=un) -> dict[str, Any]:
            s.cli("finetune", *common, "--device", s.device, "--out", w / "adapter", "--epochs", 2, "--lora-r", 2,
                  "--batch-size", 4)
            s.cli(*un, "--device", s.device, "--out", w / "unlearned")
            s.cli(*un, "--device", "cpu", "--out", w / "unlearned-cpu")
            s.cli("generate", *common, "--device", s.device, "--adapter", w / "unlearned", "--out",
                  w / "answers.jsonl", "--batch-size", 3, "--max-new-tokens", 4)
            return compare_deltas(w / "adapter", w / "unlearned", w / "unlearned-cpu")

        s.case(f"{preset}: finetune → unlearn (remove, correct, modify: new image of another size) → generate, "
               "cuda = cpu", run)


def _other_cases(s: Smoke, data: dict[str, Path]) -> None:
    w, dev = s.work / "llama", s.device

    def evaluate() -> None:
        s.cli("finetune", "--base", "tiny-llama", "--dtype", "float64", "--no-progress", "--device", dev, "--data",
              data["text_retrain"], "--out", w / "retrained", "--epochs", 2, "--lora-r", 4)
        s.cli("eval", "unlearning", "--base", "tiny-llama", "--device", dev, "--retrained", "retrained",
              "--adapters", f"corrupted={w / 'adapter'}", f"retrained={w / 'retrained'}",
              f"unlearned={w / 'default'}",
              "--splits", f"forget={data['text_forget']}", f"test={data['text_test']}",
              "--corrupted", "corrupted", "--max-new-tokens", 4, "--out", s.work / "eval-unlearning")

    s.case("eval unlearning (tiny-llama adapters)", evaluate)
    s.case("nf4 base: finetune → unlearn (tiny-llama)", lambda: _nf4(s, data))
    s.case("demo --quick --device cuda (rc, 2 refinement steps)", lambda: s.cli(
        "demo", "--quick", "--task", "rc", "--device", dev, "--refine-steps", 2, "--out", s.work / "demo",
        "--no-progress"))


def _nf4(s: Smoke, data: dict[str, Path]) -> dict[str, Any] | None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return {"status": "skipped", "note": f"bitsandbytes is not installed ({e}); see this script's docstring "
                                             "for bringing its wheel"}
    w = s.work / "nf4"
    common = ["--base", "tiny-llama", "--load-in-4bit", "--dtype", "float32", "--device", s.device, "--no-progress"]
    s.cli("finetune", *common, "--data", data["text"], "--out", w / "adapter", "--epochs", 2, "--lora-r", 4)
    s.cli("unlearn", *common, "--adapter", w / "adapter", "--data", data["text"], "--edits", data["text_edits"],
          "--out", w / "unlearned", "--max-steps", 60)
    return None


def versions() -> dict[str, Any]:
    import peft
    import transformers

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__,
                           "cuda": torch.version.cuda}
    for name in ("bitsandbytes", "deepspeed"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def card(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {"device": device, "name": platform.processor() or platform.machine()}
    props = torch.cuda.get_device_properties(torch.device(device))
    return {"device": device, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}"}


def report(s: Smoke, seconds: float) -> dict[str, Any]:
    rep = {"card": card(s.device), "versions": versions(), "seconds": round(seconds, 1), "delta_tol": DELTA_TOL,
           "cases": s.rows, "failed": sum(r["status"] == "failed" for r in s.rows),
           "skipped": sum(r["status"] == "skipped" for r in s.rows)}
    (s.out / "gpu_smoke.json").write_text(json.dumps(rep, indent=2), encoding="utf-8")
    lines = [f"# GPU smoke check on {rep['card']['name']} ({s.device})", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()), "",
             "| case | status | seconds | note |", "|---|---|---|---|"]
    for r in s.rows:
        note = r.get("error") or r.get("note") or (f"δ vs CPU {r['delta_rel_diff_vs_cpu']:.1e}"
                                                     if "delta_rel_diff_vs_cpu" in r else "")
        lines.append(f"| {r['case']} | {r['status']} | {r['seconds']} | {note} |")
    lines += ["", f"{len(s.rows)} cases, {rep['failed']} failed, {rep['skipped']} skipped, {rep['seconds']} s."]
    (s.out / "gpu_smoke.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the card to check (cpu runs the same cases, for trying the script)")
    p.add_argument("--out", type=Path, default=Path("gpu-smoke"), help="output folder (work files under OUT/work)")
    p.add_argument("--cases", default=None, help="run only the cases whose names start with one of these "
                   "comma-separated prefixes (default: all; a case's inputs come from earlier cases)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; run it on a GPU machine (or pass --device cpu to try the script)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    s = Smoke(args.out, args.device, args.cases.split(",") if args.cases else None)
    t0 = time.perf_counter()
    data = _write_data(s.work / "data")
    for model in ("tiny-llama", "tiny-llava"):
        _model_cases(s, data, model)
    _family_cases(s, data)
    _other_cases(s, data)
    rep = report(s, time.perf_counter() - t0)
    print(f"[gpu-smoke] {len(s.rows)} cases, {rep['failed']} failed, {rep['skipped']} skipped, {rep['seconds']} s "
          f"→ {args.out / 'gpu_smoke.md'}")
    return 1 if rep["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
