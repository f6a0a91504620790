"""NF4 bases: exact products through bitsandbytes' Linear4bit (CPU), no dequantized weights kept for the second
backward, and layers that keep their autograd path when the engine switches the model to eval mode (issue 8)."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from mmerase.data import Sample, digit_samples  # noqa: E402
from mmerase.influence import InfluenceEngine  # noqa: E402
from mmerase.models import LoadOptions, LoraSettings, load_model  # noqa: E402
from mmerase.models.quant import dequantized_copy, prepare_4bit  # noqa: E402
from lora_points import perturb_lora_b  # noqa: E402


def _nf4(model_dir, recompute: bool = True):
    b = load_model(model_dir, lora=LoraSettings(r=4), options=LoadOptions(quantization="nf4", device="cpu"))
    perturb_lora_b(b.model)
    if not recompute:
        prepare_4bit(b.model, recompute=False)
    return b


def _dequantize_all(model) -> int:
    """Swap every Linear4bit for an nn.Linear holding its dequantized weight (the exactness reference)."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                setattr(module, name, dequantized_copy(child))
                count += 1
    return count


def _product_and_saved_weights(bundle, samples, curvature="hessian"):
    """The engine's product, and how many tensors shaped like a 4-bit layer's weight autograd saved meanwhile."""
    engine = InfluenceEngine(bundle.model, bundle.loss_fn, samples, collate_fn=bundle.collate)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g) for p in engine.params]
    shapes = {tuple(m.weight.quant_state.shape) for m in bundle.model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    saved = []

    def pack(t):
        if t.dim() == 2 and tuple(t.shape) in shapes and t.is_floating_point():
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hv = engine.product(v, curvature, batch_size=len(samples))
    return hv, saved


@pytest.fixture(scope="module")
def samples():
    return digit_samples(range(3)) + [Sample("t", [{"from": "human", "value": "Say hi"},
                                                   {"from": "gpt", "value": "hi"}])]


def test_nf4_products_equal_those_of_the_dequantized_linear(tiny_llava_dir, samples):
    """Exact HVP and GGN products through Linear4bit (bitsandbytes' own backward, and mmerase's re-dequantizing
    one) are those of nn.Linear layers holding the dequantized weights: the same float32 arithmetic, so equal."""
    ref_bundle = _nf4(tiny_llava_dir)
    assert _dequantize_all(ref_bundle.model) == 14  # 2 layers × 7 projections of the language model
    for curvature in ("hessian", "ggn"):
        ref, _ = _product_and_saved_weights(ref_bundle, samples, curvature)
        for recompute in (True, False):
            hv, _ = _product_and_saved_weights(_nf4(tiny_llava_dir, recompute), samples, curvature)
            err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(hv, ref))
            assert err < 1e-6, (curvature, recompute, err)
        assert sum(float(h.norm()) for h in ref) > 0


def test_recompute_keeps_no_dequantized_weight_for_the_second_backward(tiny_llava_dir, samples):
    """bitsandbytes' backward is ``grad @ dequantize(W)``: under create_graph autograd saves that dequantized W
    for each layer call whose input needs a gradient (14 projections less layer 0's q/k/v, whose input comes from the
    frozen embedding); the re-dequantizing wrapper saves none."""
    _, native = _product_and_saved_weights(_nf4(tiny_llava_dir, recompute=False), samples)
    _, recompute = _product_and_saved_weights(_nf4(tiny_llava_dir, recompute=True), samples)
    assert len(native) == 11 and recompute == []


def test_4bit_layers_keep_their_autograd_path_in_the_engines_eval_mode(tiny_llava_dir, samples):
    """The engine switches the model to eval mode for products; flagged 4-bit layers stay in training mode (the
    mode that selects bitsandbytes' autograd path on CPU), everything else is in eval mode, and all is restored."""
    b = _nf4(tiny_llava_dir, recompute=False)
    engine = InfluenceEngine(b.model, b.loss_fn, samples, collate_fn=b.collate)
    b.model.train()
    seen = {}
    layer = next(m for m in b.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    attn = b.model.get_base_model().model.language_model.layers[0].self_attn
    hook = layer.register_forward_pre_hook(lambda m, a: seen.update(layer=m.training, attn=attn.training))
    engine.product([torch.zeros_like(p) for p in engine.params], "hessian")
    hook.remove()
    assert seen == {"layer": True, "attn": False}
    assert layer.training and attn.training
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # never repacked for inference


def test_gpu_memory_benchmark_runs_tiny_on_cpu(tmp_path):
    """benchmarks/gpu_memory.py --tiny on CPU: every base and measurement is reported, and the two NF4 backward
    paths (re-dequantizing and bitsandbytes' own) give the same products."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_memory.py"
    spec = importlib.util.spec_from_file_location("gpu_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    res = bench.main(["--tiny", "--device", "cpu", "--bases", "nf4,nf4-native,bf16", "--repeats", "1",
                      "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert list(res["bases"]) == ["nf4", "nf4-native", "bf16"]
    for base in res["bases"].values():
        assert base["trainable_params"] == 2 * 4 * 8 * (128 + 128) + 2 * 3 * 8 * (128 + 256)
        for m in bench.MEASURES:
            assert base[m]["peak_gib"] > 0 and base[m]["seconds"] > 0 and base[m]["norm"] > 0
    nf4, native = res["bases"]["nf4"], res["bases"]["nf4-native"]
    for m in bench.MEASURES:
        assert abs(nf4[m]["norm"] - native[m]["norm"]) <= 1e-3 * native[m]["norm"]
