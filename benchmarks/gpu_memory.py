"""Peak memory and time of a gradient, an exact HVP and GGN products on a LLaVA-1.5-7B-shaped model with LoRA.

The model is built from its config with random weights (no download): CLIP ViT-L/14-336 vision tower, 2-layer GELU
projector, Llama-2-7B language model (32 layers, 4096-d, 11008 MLP, vocabulary 32064), LoRA r=8 on the language
model's projections, eager attention (exact products need it). Each base is measured on one batch of ``--tokens``
tokens (576 image tokens + text, the last quarter scored):

- ``nf4``: NF4 language model (bitsandbytes Linear4bit, bf16 compute) with mmerase's re-dequantizing forward,
- ``nf4-native``: the same with bitsandbytes' own Linear4bit backward (keeps dequantized weights for the 2nd backward),
- ``nf4-ckpt``: ``nf4`` plus non-reentrant gradient checkpointing kept on during products,
- ``bf16``: the whole base in bf16.

Measurements go through :class:`mmerase.InfluenceEngine` exactly as a solve runs them: ``gradient`` (the mean
gradient), ``hvp`` (exact Hessian-vector product), ``fd-hessian`` (central difference of two gradients), ``ggn``
(Gauss-Newton with autograd J·v), ``ggn-fd`` (J·v by central differences); the last two of each pair are the
first-order products that ZeRO-3 allows, reported with their relative error against the exact product. Peak = ``torch.cuda.max_memory_allocated`` during the call (CPU:
peak RSS). ``--tiny`` builds a small model of the same shape family for CPU smoke tests.

    python benchmarks/gpu_memory.py --out gpu_memory.json            # on a GPU
    python benchmarks/gpu_memory.py --tiny --device cpu --out t.json  # anywhere
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmerase.influence import InfluenceEngine, make_curvature  # noqa: E402
from mmerase.memory import PeakMemory, gib  # noqa: E402
from mmerase.models.base import CausalLMTask, keep_checkpointing_in_products, upcast_trainable  # noqa: E402
from mmerase.models.llava import LLAVA_LM_TARGETS  # noqa: E402
from mmerase.models.quant import prepare_4bit  # noqa: E402

BASES = ("nf4", "bf16", "nf4-native", "nf4-ckpt")
MEASURES = ("gradient", "hvp", "fd-hessian", "ggn", "ggn-fd")
#: first-order products and the exact ones they approximate (the error ‖fd − exact‖/‖exact‖ is reported)
APPROXIMATES = {"fd-hessian": "hvp", "ggn-fd": "ggn"}
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llava_config(tiny: bool) -> Any:
    """LLaVA-1.5-7B's architecture (``tiny``: the same family at test size)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=16, patch_size=4, projection_dim=64)
        text = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        image_tokens = (16 // 4) ** 2
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           rms_norm_eps=1e-5)
        image_tokens = (336 // 14) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 1,
                      image_seq_length=image_tokens, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return cfg


def build_model(cfg: Any, base: str, device: torch.device) -> torch.nn.Module:
    """Random-weight LLaVA directly on ``device`` in bf16, optionally NF4 language model, LoRA r=8 on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        with device:
            try:
                model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16,
                                                                   attn_implementation="eager")
            except TypeError:  # older transformers
                model = LlavaForConditionalGeneration._from_config(cfg, torch_dtype=torch.bfloat16,
                                                                   attn_implementation="eager")
    model.requires_grad_(False)
    if base.startswith("nf4"):
        quantize_language_model(model, device)
        prepare_4bit(model, recompute=base != "nf4-native")
    if base.endswith("ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LLAVA_LM_TARGETS,
                                                 task_type="CAUSAL_LM"))
    upcast_trainable(model)
    if base.endswith("ckpt"):
        keep_checkpointing_in_products(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # LoRA starts at B = 0: give it generic values
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 1e-3).to(p))
    return model


def quantize_language_model(model: torch.nn.Module, device: torch.device) -> int:
    """Replace the language model's projections by bitsandbytes NF4 ``Linear4bit`` (quantized on ``device``)."""
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        if "language_model" not in name:
            continue
        for child_name, child in list(module.named_children()):
            if child_name in LM_PROJECTIONS and isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q.to(device))
                del child
                count += 1
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return count


def make_batch(cfg: Any, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One sample of ``tokens`` tokens: BOS, the image tokens, random text; the last quarter is the scored answer."""
    g = torch.Generator().manual_seed(3)
    n_img = cfg.image_seq_length
    text_len = tokens - n_img - 1
    if text_len < 4:
        raise ValueError(f"--tokens must exceed the {n_img} image tokens by at least 5")
    text = torch.randint(3, cfg.text_config.vocab_size - 1, (text_len,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((n_img,), cfg.image_token_index), text]).unsqueeze(0)
    labels = torch.full_like(ids, -100)
    labels[:, -(tokens // 4):] = ids[:, -(tokens // 4):]
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device), "pixel_values": pixels.to(device, torch.bfloat16)}


def measure(base: str, cfg: Any, tokens: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Build ``base``, then time and measure each product (one warm-up, ``repeats`` timed runs)."""
    t0 = time.perf_counter()
    model = build_model(cfg, base, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    batch = make_batch(cfg, tokens, device)
    engine = InfluenceEngine(model, CausalLMTask(pixel_dtype=torch.bfloat16), [batch], collate_fn=lambda xs: xs[0])
    out: dict[str, Any] = {"build_s": round(time.perf_counter() - t0, 2),
                           "trainable_params": sum(p.numel() for p in engine.params),
                           "weights_gib": gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None}
    g = torch.Generator().manual_seed(4)
    v = [torch.randn(p.shape, generator=g).to(p) for p in engine.params]
    calls = {
        "gradient": lambda: engine.mean_gradient([0], 1),
        "hvp": lambda: engine.product(v, "hessian", batch_size=1),
        "fd-hessian": lambda: engine.product(v, "fd-hessian", batch_size=1),
        "ggn": lambda: engine.product(v, "ggn", batch_size=1),
        "ggn-fd": lambda: engine.product(v, make_curvature("ggn", ggn_jvp="fd"), batch_size=1),
    }
    kept: dict[str, list[torch.Tensor]] = {}
    for name, fn in calls.items():
        try:
            fn()  # warm-up (kernels, allocator)
            times, peaks, result = [], [], None
            for _ in range(repeats):
                with PeakMemory(device) as pm:
                    result = fn()
                times.append(pm.result["seconds"])
                peaks.append(pm.result["peak_bytes"])
            norm = float(sum(float(t.double().norm()) ** 2 for t in result) ** 0.5)
            out[name] = {"peak_gib": gib(max(peaks)), "seconds": round(statistics.median(times), 4), "norm": norm}
            if name in APPROXIMATES.values():
                kept[name] = result
            elif name in APPROXIMATES and APPROXIMATES[name] in kept:
                ref = kept[APPROXIMATES[name]]
                err = sum(float((a.double() - b.double()).norm()) ** 2 for a, b in zip(result, ref)) ** 0.5
                out[name]["rel_error"] = err / out[APPROXIMATES[name]]["norm"]
        except torch.cuda.OutOfMemoryError as e:
            out[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del engine, model, batch, v, kept
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def table(results: dict[str, Any]) -> str:
    """Markdown table: peak GiB / seconds per base and measurement."""
    lines = ["| base | weights GiB | " + " | ".join(f"{m} peak GiB / s" for m in MEASURES) + " |",
             "|---|---|" + "---|" * len(MEASURES)]
    for base, r in results["bases"].items():
        cells = []
        for m in MEASURES:
            x = r.get(m, {})
            cell = x["error"] if "error" in x else f"{x['peak_gib']:.2f} / {x['seconds']:.3f}"
            if "rel_error" in x:
                cell += f" (err {x['rel_error']:.1%})"
            cells.append(cell)
        lines.append(f"| {base} | {r.get('weights_gib')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same family (CPU smoke test)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tokens", type=int, default=None, help="tokens in the batch (default 1024; tiny: 48)")
    p.add_argument("--bases", default=",".join(BASES), help=f"comma-separated subset of {', '.join(BASES)}")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads() if not a.tiny else 1)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bases = [b for b in a.bases.split(",") if b]
    unknown = sorted(set(bases) - set(BASES))
    if unknown:
        p.error(f"unknown base {unknown[0]!r}; choose from {', '.join(BASES)}")
    cfg = llava_config(a.tiny)
    tokens = a.tokens or (48 if a.tiny else 1024)
    results: dict[str, Any] = {
        "model": "tiny LLaVA" if a.tiny else "LLaVA-1.5-7B shape (CLIP ViT-L/14-336 + Llama-2-7B), random weights",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tokens": tokens, "lora_r": 8, "versions": _versions(), "bases": {}}
    for base in bases:
        results["bases"][base] = measure(base, cfg, tokens, device, a.repeats)
        print(f"{base}: {json.dumps(results['bases'][base])}", flush=True)
        if a.out:  # after each base, so a run cut short keeps what it measured
            Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
