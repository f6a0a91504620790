"""Cost of one curvature-vector product against one gradient, on LoRA adapters of each vision-language family.

For each model: one gradient of the mean training loss (``InfluenceEngine.mean_gradient``) and one product
(``InfluenceEngine.product``, exactly what a solve calls once per CG step) over the same samples, with each
curvature backend: the exact HVP (double backward), the finite-difference HVP, and the Gauss-Newton product with an
autograd or a finite-difference J·v. Each is run with the model's own collate (image features recomputed in every
pass) and with the frozen-feature cache (``bundle.feature_cache()``: vision tower and projector run once per image).

Models (random base weights and a randomly perturbed LoRA r=8 adapter on the language model: the cost of a pass
does not depend on the values):
- ``tiny-llava``: the preset (vision 64-d × 2 layers, LM 128-d × 2 layers; 16×16 images, 16 patches).
- ``llava-512``: the same layout built here from a config: vision tower 256-d × 4 layers, LM 512-d × 4 layers.
- ``--families``: the tiny presets of the other families (``tiny-llava-next``, ``tiny-llava-onevision``,
  ``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``; vision 32-d × 2 layers, LM 64-d × 2 layers) on digit
  images of six sizes from 28 to 56 px, so the vision tokens per image vary as they do with real images; written to
  ``product_cost_families.{json,md}``.

Time: the minimum over ``--reps`` rounds (after a warm-up; the operations interleaved round by round) of the CPU
seconds (``time.process_time``; one torch thread, so this is the work done, which other processes on a shared
machine disturb far less than the wall time) and of the wall seconds; the ratios to one gradient use the CPU
seconds, the wall-clock ratios are reported beside them. Memory: the process's peak resident set
during the call minus its resident set at entry (``mmerase.memory.PeakMemory``: VmHWM reset per call through
/proc/self/clear_refs), with glibc told to mmap every allocation ≥ 64 KiB (``MALLOC_MMAP_THRESHOLD_``, set by
re-executing the script) so that freed tensors leave the resident set at once instead of being kept in the heap;
the figure is then close to the peak of live tensors the call adds. tracemalloc sees none of torch's memory.

    python benchmarks/product_cost.py                 # writes benchmarks/product_cost.{json,md}
    python benchmarks/product_cost.py --families      # writes benchmarks/product_cost_families.{json,md}
    python benchmarks/product_cost.py --smoke --out /tmp/pc
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmerase import InfluenceEngine
from mmerase.data import DIGIT_QUESTION, DIGIT_WORDS, Sample, digit_images, digit_samples
from mmerase.influence import vectors as V
from mmerase.influence.curvature import make_curvature
from mmerase.memory import PeakMemory
from mmerase.models import LoadOptions, LoraSettings, load_model
from mmerase.models.presets import HEAD_SCALE, PRESETS, build_preset
from mmerase.record import machine, versions, write_json

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
#: (label, curvature name, ggn_jvp); "gradient" is the unit every product is divided by
OPS = [("gradient", None, None), ("exact HVP", "hessian", "autograd"), ("FD-HVP", "fd-hessian", "autograd"),
       ("GGN (autograd J·v)", "ggn", "autograd"), ("GGN (fd J·v)", "ggn", "fd")]
BAR_HVP = 2.5
#: the families measured by ``--families`` (their tiny presets) and the image sizes (width, height) they see
FAMILY_PRESETS = tuple(p for p in PRESETS if p not in ("tiny-llava", "tiny-llama"))
FAMILY_SIZES = [(28, 28), (56, 28), (28, 48), (40, 40), (36, 56), (48, 32)]


def build_large_llava(folder: Path, seed: int = 0, smoke: bool = False) -> Path:
    """A bigger LLaVA-style base than the preset: the preset's tokenizer, processor and layout (16×16 images, patch
    4) with a 256-d × 4-layer vision tower and a 512-d × 4-layer LM (smaller in ``smoke`` mode), random weights."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    if (folder / "config.json").is_file():
        return folder
    width, layers = (96, 2) if smoke else (512, 4)
    build_preset("tiny-llava", folder, seed=seed, hidden_size=width, intermediate_size=2 * width,
                 num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    config = LlavaConfig.from_pretrained(folder)
    vision = config.vision_config
    vision.hidden_size, vision.intermediate_size = width // 2, width
    vision.num_hidden_layers, vision.num_attention_heads = layers, 4
    vision.projection_dim = width // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.generation_config = GenerationConfig.from_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def sized_digit_samples(n: int) -> list[Sample]:
    """Digit samples whose images cycle through :data:`FAMILY_SIZES` (nearest-neighbour resized)."""
    images, labels = digit_images(16, n)
    return [Sample(id=f"digit-{i}", image=img.resize(FAMILY_SIZES[i % len(FAMILY_SIZES)]),
                   conversations=[{"from": "human", "value": DIGIT_QUESTION},
                                  {"from": "gpt", "value": DIGIT_WORDS[labels[i]]}])
            for i, img in enumerate(images)]


def _perturb_adapter(params: list[torch.Tensor], seed: int) -> None:
    """LoRA starts with B = 0 (so H has zero blocks): give every adapter entry a small random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _run_op(engine: InfluenceEngine, op: tuple, v: V.Vec, batch_size: int) -> V.Vec:
    _, curvature, jvp = op
    if curvature is None:
        return engine.mean_gradient(list(range(engine.n)), batch_size)
    return engine.product(v, make_curvature(curvature, ggn_jvp=jvp), batch_size=batch_size)


def measure(engines: dict[str, InfluenceEngine], v: V.Vec, batch_size: int, reps: int
            ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[tuple[str, str], V.Vec]]:
    """Every (mode, op) once as a warm-up (which fills the feature cache), then ``reps`` rounds that run each once,
    interleaved so that a change in the machine's load hits all of them alike. Per (mode, op): the minimum and
    median wall and CPU seconds and the median peak of extra resident memory; also the results."""
    results, samples = {}, {}
    for mode, engine in engines.items():
        for op in OPS:
            results[(mode, op[0])] = _run_op(engine, op, v, batch_size)
    for rep in range(reps):
        for mode, engine in engines.items():
            for op in OPS:
                print(f"    round {rep + 1}/{reps} {mode:9s} {op[0]}", flush=True)
                cpu = time.process_time()
                with PeakMemory("cpu") as m:
                    _run_op(engine, op, v, batch_size)
                cpu = time.process_time() - cpu
                s = samples.setdefault((mode, op[0]), {"wall": [], "cpu": [], "peak": [], "scope": None})
                s["wall"].append(m.result["seconds"])
                s["cpu"].append(cpu)
                s["peak"].append(m.result["peak_bytes"] - m.result["start_bytes"])
                s["scope"] = m.result["peak_scope"]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for (mode, label), s in samples.items():
        rows.setdefault(label, {})[mode] = {
            "wall_s": min(s["wall"]), "wall_s_median": statistics.median(s["wall"]), "cpu_s": min(s["cpu"]),
            "cpu_s_median": statistics.median(s["cpu"]), "wall_all": s["wall"], "cpu_all": s["cpu"],
            "peak_mib": statistics.median(s["peak"]) / 2**20, "peak_scope": s["scope"]}
    return rows, results


def _dims(config: Any) -> dict[str, Any]:
    """Width, MLP width, depth and heads of a vision or text config (Qwen-VL vision configs name them apart)."""
    width = getattr(config, "embed_dim", None) or config.hidden_size
    mlp = getattr(config, "intermediate_size", None) or width * getattr(config, "mlp_ratio", 0)
    return {"hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads}


def bench_model(name: str, base: Path, n: int, batch_size: int, reps: int, seed: int,
                sized: bool = False) -> dict[str, Any]:
    """One model's table: each op recomputing image features and with the feature cache. ``sized``: images of
    :data:`FAMILY_SIZES` instead of the 16×16 digits."""
    bundle = load_model(base, lora=LoraSettings(r=8, alpha=16.0, seed=seed),
                        options=LoadOptions(device="cpu", exact_hvp=True))
    samples = sized_digit_samples(n) if sized else digit_samples(list(range(n)))
    engine0 = InfluenceEngine(bundle.model, bundle.loss_fn, samples, collate_fn=bundle.collate)
    _perturb_adapter(engine0.params, seed)
    g = torch.Generator().manual_seed(seed + 1)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in engine0.params]
    cache = bundle.feature_cache()
    modes = {"recompute": engine0,
             "cached": InfluenceEngine(bundle.model, cache.loss_fn, samples, collate_fn=cache.collate)}
    lengths = bundle.collate(samples)["attention_mask"].sum(dim=1).tolist()
    image_tokens = [t for s in samples for t in bundle.image_set(s).tokens]
    config = bundle.base_model().config
    info = {"family": bundle.family, "trainable_params": sum(p.numel() for p in engine0.params),
            "total_params": sum(p.numel() for p in bundle.model.parameters()),
            "samples": n, "batch_size": batch_size, "tokens_per_sample": int(lengths[0]),
            "tokens_per_sample_range": [int(min(lengths)), int(max(lengths))],
            "image_tokens_range": [min(image_tokens), max(image_tokens)],
            "config": {k: _dims(getattr(config, k)) for k in ("vision_config", "text_config")}}
    rows, results = measure(modes, v, batch_size, reps)
    for label, row in rows.items():
        for mode in modes:
            for key in ("wall_s", "cpu_s"):
                row[mode][f"x_gradient_{key[:-2]}"] = row[mode][key] / rows["gradient"][mode][key]
        row["cache_speedup_cpu"] = row["recompute"]["cpu_s"] / row["cached"]["cpu_s"]
        row["cache_speedup_wall"] = row["recompute"]["wall_s"] / row["cached"]["wall_s"]
        row["cached_vs_recompute_rel_diff"] = _rel(results[("cached", label)], results[("recompute", label)])
    rows["FD-HVP"]["rel_err_vs_exact"] = _rel(results[("recompute", "FD-HVP")], results[("recompute", "exact HVP")])
    rows["GGN (fd J·v)"]["rel_err_vs_exact"] = _rel(results[("recompute", "GGN (fd J·v)")],
                                                    results[("recompute", "GGN (autograd J·v)")])
    info["cached_images"] = cache.n_images
    return {"info": info, "rows": rows}


def _rel(a: V.Vec, b: V.Vec) -> float:
    return float((V.flatten(a) - V.flatten(b)).norm() / V.flatten(b).norm())


def models_to_run(args: argparse.Namespace, work: Path) -> list[tuple[str, Path, int, bool]]:
    """(name, base folder, samples, sized images) of each model this run measures (bases built on first use)."""
    if args.families:
        return [(name, _preset(work, name, args.seed), args.samples, True) for name in FAMILY_PRESETS]
    large = build_large_llava(work / ("llava-smoke" if args.smoke else "llava-512"), args.seed, args.smoke)
    return [("tiny-llava", _preset(work, "tiny-llava", args.seed), args.samples, False),
            ("llava-512", large, args.large_samples, False)]


def _preset(work: Path, name: str, seed: int) -> Path:
    folder = work / name
    if not (folder / "config.json").is_file():
        build_preset(name, folder, seed=seed)
    return folder


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": vars(args), "machine": machine(), "versions": versions(),
                              "load_avg_start": os.getloadavg(), "threads": torch.get_num_threads(),
                              "malloc_mmap_threshold": os.environ.get(MMAP_ENV), "models": {},
                              "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    for name, base, n, sized in models_to_run(args, work):
        report["models"][name] = bench_model(name, base, n, args.batch_size, args.reps, args.seed, sized)
    report["load_avg_end"] = os.getloadavg()
    hvp = {m: r["rows"]["exact HVP"]["recompute"]["x_gradient_cpu"] for m, r in report["models"].items()}
    wall = {m: r["rows"]["exact HVP"]["recompute"]["x_gradient_wall"] for m, r in report["models"].items()}
    report["bar"] = {"exact_hvp_max_x_gradient": BAR_HVP, "measured": hvp, "measured_wall": wall,
                     "met": all(x <= BAR_HVP for x in hvp.values())}
    return report


def write_report(out: str | Path, stem: str, report: dict[str, Any], md: str) -> Path:
    """Write ``stem``.json and ``stem``.md into ``out`` and print the Markdown (how every benchmark here reports)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", report)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return out


def _f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd or x == 0 else f"{x:.1e}"


def _tokens(info: dict[str, Any]) -> str:
    lo, hi = info.get("tokens_per_sample_range", [info["tokens_per_sample"]] * 2)
    if lo == hi:
        return f"{lo} tokens"
    images = info["image_tokens_range"]
    return f"{lo}–{hi} tokens ({images[0]}–{images[1]} vision tokens per image of 28–56 px)"


def markdown(rep: dict[str, Any]) -> str:
    m, ver = rep["machine"], rep["versions"]
    title = ("one product against one gradient, per vision-language family" if rep["config"].get("families")
             else "one curvature product against one gradient (issue 9)")
    lines = [f"# Product cost: {title}", "",
             f"Machine: {m['cpu']} ({m['cores']} cores, shared; one torch thread; load average "
             f"{rep['load_avg_start'][0]:.1f} at start, {rep['load_avg_end'][0]:.1f} at end), torch {ver['torch']}, "
             f"transformers {ver['transformers']}, peft {ver['peft']}; seed {rep['config']['seed']}; {rep['date']}.",
             f"Time: minimum over {rep['config']['reps']} interleaved rounds after a warm-up, CPU seconds (one "
             "thread) and wall seconds; × gradient = CPU-time ratio (wall-time ratio in brackets). Memory: median "
             "peak resident set during the call minus the resident set at entry (VmHWM reset per call, allocations "
             "≥ 64 KiB mmapped).", ""]
    for name, r in rep["models"].items():
        i = r["info"]
        vc, tc = i["config"]["vision_config"], i["config"]["text_config"]
        lines += [f"## {name}", "",
                  f"Vision {vc['hidden_size']}-d × {vc['num_hidden_layers']} layers, LM {tc['hidden_size']}-d × "
                  f"{tc['num_hidden_layers']} layers ({i['total_params']:,} parameters), LoRA r=8 on the LM "
                  f"({i['trainable_params']:,} trainable); {i['samples']} digit samples of {_tokens(i)}, "
                  f"batch {i['batch_size']}; float32, eager attention.", "",
                  "| pass | CPU s | × gradient | peak MiB | CPU s, feature cache | × gradient | peak MiB | "
                  "cache speed-up | rel. error |", "|---|---|---|---|---|---|---|---|---|"]
        for label, row in r["rows"].items():
            rc, ca = row["recompute"], row["cached"]
            err = row.get("rel_err_vs_exact")
            lines.append(f"| {label} | {_f(rc['cpu_s'], 3)} | {_f(rc['x_gradient_cpu'])} "
                         f"({_f(rc['x_gradient_wall'])}) | {_f(rc['peak_mib'], 1)} | {_f(ca['cpu_s'], 3)} | "
                         f"{_f(ca['x_gradient_cpu'])} ({_f(ca['x_gradient_wall'])}) | {_f(ca['peak_mib'], 1)} | "
                         f"×{_f(row['cache_speedup_cpu'])} (×{_f(row['cache_speedup_wall'])}) | "
                         f"{'' if err is None else f'{err:.1e}'} |")
        lines += ["", "rel. error: FD-HVP against the exact HVP, fd GGN against the autograd GGN (same vector); "
                  "cached and recomputed products agree to "
                  f"{max(row['cached_vs_recompute_rel_diff'] for row in r['rows'].values()):.1e}.", ""]
    b = rep["bar"]
    lines += [f"**Bar: exact HVP ≤ {b['exact_hvp_max_x_gradient']} gradients** (CPU time, recomputed features): " +
              ", ".join(f"{k} {_f(x)}" for k, x in b["measured"].items()) + f" → {'met' if b['met'] else 'MISSED'} "
              "(wall time: " + ", ".join(f"{k} {_f(x)}" for k, x in b["measured_wall"].items()) + ").", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent), help="folder for product_cost.json/.md")
    p.add_argument("--work", default="/tmp/mmerase-product-cost", help="scratch folder for the built bases")
    p.add_argument("--samples", type=int, default=64, help="samples per pass, tiny-llava")
    p.add_argument("--large-samples", type=int, default=32, help="samples per pass, llava-512")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", action="store_true",
                   help="the tiny presets of LLaVA-NeXT, LLaVA-OneVision and Qwen2/2.5/3-VL instead (images of "
                        "28–56 px); writes product_cost_families.{json,md}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.samples, args.large_samples, args.batch_size, args.reps = 8, 4, 4, 1
        args.work = args.work + "-smoke"
    report = run(args)
    write_report(args.out, "product_cost_families" if args.families else "product_cost", report, markdown(report))
    return 0


if __name__ == "__main__":
    if os.environ.get(MMAP_ENV) is None:  # glibc reads it at start-up: re-execute with it set
        os.environ[MMAP_ENV] = "65536"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.exit(main())
