"""Frozen-feature caching (issue 7): cached image features give the products of recomputing them, with the projector
frozen (its output cached) or trainable (only the vision tower's output cached), and nothing is cached when the
vision tower trains."""

from __future__ import annotations

import pytest
import torch

from mmerase import Edit, InfluenceEngine
from mmerase.data import Sample, digit_samples, modify_sample
from mmerase.influence import vectors as V
from mmerase.models import LoadOptions, LoraSettings, load_model
from lora_points import perturb_lora_b

F64 = LoadOptions(dtype="float64", device="cpu")




def _samples():
    text = Sample("t1", [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}])
    return digit_samples(range(6)) + [text]


def _rel(a, b):
    return float((V.flatten(a) - V.flatten(b)).norm() / V.flatten(b).norm())


@pytest.fixture(scope="module", params=[False, True], ids=["frozen-projector", "trainable-projector"])
def llava(request, tiny_llava_dir):
    b = load_model(tiny_llava_dir, lora=LoraSettings(r=2, train_projector=request.param), options=F64)
    perturb_lora_b(b.model)
    return b


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_cached_features_give_the_same_products(llava, curvature):
    samples = _samples()
    cache = llava.feature_cache()
    assert cache.level == ("vision" if any("multi_modal_projector" in n for n in llava.trainable_parameters())
                           else "projector")
    plain = InfluenceEngine(llava.model, llava.loss_fn, samples, collate_fn=llava.collate)
    cached = InfluenceEngine(llava.model, cache.loss_fn, samples, collate_fn=cache.collate)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in plain.params]
    ref = plain.product(v, curvature, batch_size=4)
    first = cached.product(v, curvature, batch_size=4)  # fills the cache (6 images, in two batches)
    again = cached.product(v, curvature, batch_size=3)  # other batches: every image a hit
    assert _rel(first, ref) < 1e-10 and _rel(again, ref) < 1e-10
    assert cache.n_images == 6 and cache.misses == 6 and cache.hits == 6
    # the edit gradient, with an edited image that is not cached yet
    z = samples[0]
    edit = Edit(old=z, new=modify_sample(z, image=samples[1].image.rotate(90)))
    assert _rel(cached.edit_gradient([edit]), plain.edit_gradient([edit])) < 1e-10
    assert cache.n_images == 7


def test_inputs_embeds_fallback_matches(llava):
    """transformers without ``mm_encoder_outputs`` get the features scattered into inputs_embeds: same loss."""
    cache = llava.feature_cache()
    samples = _samples()
    batch = cache.collate(samples)
    with torch.no_grad():
        native = float(cache.loss_fn(llava.model, batch))
        cache.loss_fn._native = False
        try:
            fallback = float(cache.loss_fn(llava.model, batch))
        finally:
            cache.loss_fn._native = None
        plain = float(llava.loss_fn(llava.model, llava.collate(samples)))
    assert abs(native - fallback) < 1e-12 and abs(native - plain) < 1e-12


def test_nothing_cached_when_the_vision_tower_trains(tiny_llava_dir, tiny_llama_dir):
    b = load_model(tiny_llava_dir, lora=LoraSettings(r=2, target_modules=r".*vision_tower.*\.q_proj"), options=F64)
    assert b.feature_cache() is None
    assert load_model(tiny_llama_dir, lora=LoraSettings(r=2), options=F64).feature_cache() is None
