"""First-order curvature products on a tiny text model in float64 against independent references: the GGN against
a dense Jᵀ(diag p − ppᵀ)J built from forward-mode Jacobians, FD against exact products within their error bound,
the sampled-label Fisher's expectation (and its token-count scale), checkpointing during products, and the
per-block memory meter (issue 8)."""

from __future__ import annotations

import math

import pytest
import torch
import dense_refs
from lora_points import perturb_lora_b

from mmerase.data import Sample
from mmerase.influence import InfluenceEngine, make_curvature
from mmerase.influence import vectors as V
from mmerase.models import LoadOptions, LoraSettings, load_model

#: one LoRA on one projection (r=2, 512 parameters): small enough for dense references
ONE_LORA = LoraSettings(r=2, target_modules=r".*layers\.1\.self_attn\.v_proj")


def _chat(sid: str, q: str, a: str) -> Sample:
    return Sample(sid, [{"from": "human", "value": q}, {"from": "gpt", "value": a}])


SAMPLES = [_chat("a", "Say hi", "hi there"), _chat("b", "Count", "one two three four")]


def _bundle(model_dir, dtype="float64", lora=ONE_LORA, scale=0.5, **opts):
    b = load_model(model_dir, lora=lora, options=LoadOptions(dtype=dtype, device="cpu", **opts))
    perturb_lora_b(b.model, scale=scale, draw_dtype=torch.float64)
    return b


@pytest.fixture(scope="module")
def text64(tiny_llama_dir):
    b = _bundle(tiny_llama_dir)
    return b, InfluenceEngine(b.model, b.loss_fn, SAMPLES, collate_fn=b.collate)


def _vec(engine, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in engine.params]


def _rel(a, b) -> float:
    return V.norm(V.sub(a, b)) / V.norm(b)


@pytest.fixture(scope="module")
def dense_ggn(text64) -> torch.Tensor:
    bundle, engine = text64
    return dense_refs.dense_ggn(bundle, engine, SAMPLES)


def test_ggn_products_equal_the_dense_ggn_and_are_psd(text64, dense_ggn):
    _, engine = text64
    eig = torch.linalg.eigvalsh(dense_ggn)
    assert eig[0] > -1e-12 * eig[-1]  # PSD up to rounding
    for seed in (1, 2):
        v = _vec(engine, seed)
        want = V.unflatten(dense_ggn @ V.flatten(v), v)
        exact = engine.product(v, "ggn", batch_size=1)
        assert _rel(exact, want) < 1e-10
        # J·v by central differences, then one backward: error O(ε²) + O(u/ε) with ε = u^(1/3)·‖θ‖/‖v‖, u = 2.2e-16
        fd = engine.product(v, make_curvature("ggn", ggn_jvp="fd"), batch_size=2)
        assert _rel(fd, want) < 1e-7
        assert V.dot(v, exact) > 0


def test_fd_hessian_matches_exact_within_its_error_bound(tiny_llama_dir):
    """Central differences with step ε (relative to ‖θ‖/‖v‖) err by C·ε² (truncation) + ~u/ε (rounding, u the unit
    roundoff). In float64 the error falls exactly 100× per 10× smaller ε (the ε² law, C ≈ 25 at this point), so the
    default ε = u^(1/3) ≈ 6e-6 must land near C·ε² ≈ 1e-9; the bound 1e-8 allows 10×. In float32 the default
    ε ≈ 5e-3 gives C·ε² ≈ 6e-4, with rounding ~u/ε ≈ 1e-5 below it: the bound 5e-3 allows ~8×."""
    errors = {}
    for dtype in ("float64", "float32"):
        b = _bundle(tiny_llama_dir, dtype=dtype, lora=LoraSettings(r=2), scale=0.05)
        engine = InfluenceEngine(b.model, b.loss_fn, SAMPLES, collate_fn=b.collate)
        v = _vec(engine, 3)
        exact = engine.product(v, "hessian", batch_size=2)
        for eps in (None, 1e-3, 1e-4) if dtype == "float64" else (None,):
            fd = engine.product(v, make_curvature("fd-hessian", fd_eps=eps), batch_size=2)
            errors[dtype, eps] = _rel(fd, exact)
    assert 90 < errors["float64", 1e-3] / errors["float64", 1e-4] < 110
    assert errors["float64", None] < 1e-8
    assert errors["float32", None] < 5e-3


def test_sampled_fisher_is_unbiased_for_the_ggn_with_the_token_count_scale(text64, dense_ggn):
    """E over label draws of vᵀF̂v equals vᵀGv. The mean over 160 seeds lies within 4 standard errors of vᵀGv;
    without the token-count factor T (9 and 19 response tokens here) its expectation would be at most vᵀGv / 9."""
    bundle, engine = text64
    counts = [bundle.loss_fn.label_count(engine.collate([s])) for s in SAMPLES]
    assert counts == [9, 19]  # byte tokens of the answers plus EOS
    v = _vec(engine, 4)
    target = float(V.flatten(v) @ dense_ggn @ V.flatten(v))
    forms = torch.tensor([V.dot(v, engine.product(v, make_curvature("sampled-fisher", seed=s), batch_size=2))
                          for s in range(160)], dtype=torch.float64)
    mean, sem = float(forms.mean()), float(forms.std() / math.sqrt(len(forms)))
    assert abs(mean - target) < 4 * sem
    assert mean - target / min(counts) > 6 * sem
    # fixed operator: the same seed gives the same product, whatever the batching
    f = make_curvature("sampled-fisher", seed=7)
    assert _rel(engine.product(v, f, batch_size=1), engine.product(v, f, batch_size=2)) < 1e-12


def test_checkpointing_stays_on_during_products_and_keeps_them_exact(tiny_llava_dir):
    """transformers checkpoints a layer only in training mode and the engine switches the model to eval mode for
    products: the checkpointed layers keep training mode there, so the double-backward HVP runs checkpointed (the
    checkpoint function is called, autograd saves fewer bytes) and equals the plain HVP."""
    from mmerase.data import digit_samples

    samples = digit_samples(range(3))
    results = {}
    for ckpt in (False, True):
        b = _bundle(tiny_llava_dir, lora=LoraSettings(r=2), gradient_checkpointing=ckpt)
        calls = []
        for m in b.model.modules():
            if getattr(m, "mmerase_keep_training", False):
                inner = m._gradient_checkpointing_func
                m._gradient_checkpointing_func = lambda *a, inner=inner, **k: calls.append(1) or inner(*a, **k)
        engine = InfluenceEngine(b.model, b.loss_fn, samples, collate_fn=b.collate)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            hv = engine.product(_vec(engine, 5), "hessian", batch_size=3)
        results[ckpt] = (hv, len(calls), sum(saved))
    assert results[False][1] == 0 and results[True][1] == 4  # 2 language + 2 vision layers, checkpointed
    assert results[True][2] < 0.9 * results[False][2]
    assert _rel(results[True][0], results[False][0]) < 1e-12


def test_peak_memory_meter_sees_a_block_allocation():
    from mmerase.memory import PeakMemory

    import mmap

    with PeakMemory("cpu") as m:  # 64 MiB of fresh pages, touched (an allocator may reuse resident memory)
        block = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        block.close()
    r = m.result
    assert r["kind"] == "cpu_rss" and r["seconds"] >= 0
    if r["peak_scope"] != "block":  # the kernel refused to reset the peak (/proc/self/clear_refs)
        pytest.skip("this kernel cannot reset the resident-set peak, so the meter reports the process's peak")
    assert r["peak_bytes"] - r["start_bytes"] >= 60 * 2**20



def test_fd_step_follows_the_precision_the_model_computes_in(tiny_llava_dir):
    """A float32 adapter on a bf16 base: forward passes round to bf16 (eps 2^-7), so a step sized for float32
    (cbrt(2^-23) ≈ 5e-3) drowns the difference in rounding noise. The default step follows the base's bf16
    (cbrt(2^-7) ≈ 0.2): fd-hessian and ggn-fd then land within a few percent of the exact products (bf16's floor is
    ~eps^(2/3) ≈ 2.5%), against tens of percent with the float32-sized step."""
    from mmerase.data import digit_samples
    from mmerase.influence.curvature import compute_dtype

    b = _bundle(tiny_llava_dir, dtype="bfloat16", lora=LoraSettings(r=8), scale=0.01)
    assert compute_dtype(b.model) == torch.bfloat16 and {p.dtype for p in b.trainable_parameters().values()} == \
        {torch.float32}
    engine = InfluenceEngine(b.model, b.loss_fn, digit_samples(range(4)), collate_fn=b.collate)
    v = [t.float() for t in _vec(engine, 1)]
    exact = {"fd-hessian": engine.product(v, "hessian", batch_size=4), "ggn": engine.product(v, "ggn", batch_size=4)}
    f32_step = torch.finfo(torch.float32).eps ** (1 / 3)
    for name, kw in (("fd-hessian", {}), ("ggn", {"ggn_jvp": "fd"})):
        default = engine.product(v, make_curvature(name, **kw), batch_size=4)
        too_small = engine.product(v, make_curvature(name, fd_eps=f32_step, **kw), batch_size=4)
        assert _rel(default, exact[name]) < 0.1 < 0.2 < _rel(too_small, exact[name])
