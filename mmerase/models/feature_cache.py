"""Frozen-feature caching for vision-language models: compute each sample's image features once, not in every product.

With the default LoRA (language model only) the vision encoder and the projector are frozen, so an image's features
never change while the engine multiplies by the curvature tens of times over the same training images. The cache
keys features by the exact tensors the image processor produced for one sample's images (a digest of their bytes,
sizes and grids), and computes them with the model's own ``get_image_features``, so a cached batch gives the same
logits as recomputing the features, whatever the image source or batch.

Where it is exact, and where nothing is cached:

- every family, vision encoder and projector frozen: the projector's output is cached (level 'projector');
- LLaVA-1.5 with a trainable projector: the vision tower's output is cached and the projector runs, with gradients,
  inside every forward (level 'vision');
- the other families with a trainable projector, and any family with a trainable vision encoder: nothing is cached
  (``bundle.feature_cache()`` returns ``None``) and products recompute the image features.

Features are fed back through the model's ``mm_encoder_outputs`` argument (transformers ≥ 5); with older versions,
LLaVA-style models get them scattered into ``inputs_embeds`` instead. The engine stays model-agnostic: it gets
:attr:`FrozenFeatureCache.collate` and :attr:`FrozenFeatureCache.loss_fn` in place of the bundle's own.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmerase.data import Sample
from mmerase.models.task import CausalLMTask
from mmerase.utils import model_device, move_to

FEATURES_KEY = "image_features"
LEVELS = ("projector", "vision")


class FrozenFeatureCache:
    """Image features of a vision bundle by content; ``level`` is 'projector' (projector output cached) or 'vision'
    (vision tower output cached, projector recomputed because it trains; LLaVA-1.5 only).

    Every distinct image set seen stays cached on the model's device (images × tokens × width values: 4.7 MB per
    image for LLaVA-1.5-7B in bf16), so one cache serves one solve or a few; :meth:`clear` frees it.
    """

    def __init__(self, bundle: Any, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown feature cache level {level!r}; use 'projector' or 'vision'")
        self.bundle, self.level = bundle, level
        self._features: dict[str, dict[str, Any]] = {}
        self._counts: dict[str, int] = {}
        self.hits = self.misses = 0
        self.loss_fn = CachedFeatureTask(bundle.loss_fn, self)

    @property
    def n_images(self) -> int:
        """How many images have features cached."""
        return sum(self._counts.values())

    def clear(self) -> None:
        self._features.clear()
        self._counts.clear()

    @torch.no_grad()
    def _compute(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Features of merged image sets, per image, with the vision modules in eval mode (as products run)."""
        model = self.bundle.base_model()
        vision, projectors = self.bundle.image_modules()
        modules = [vision] + projectors
        modes = [(m, m.training) for part in modules for m in part.modules()]
        inputs = move_to(tensors, model_device(model))
        inputs = {k: v.to(self.bundle.compute_dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        try:
            for part in modules:
                part.eval()
            return self.bundle.image_features(inputs, self.level)
        finally:
            for m, t in modes:
                m.training = t

    def features(self, sets: Sequence[Any]) -> list[dict[str, Any]]:
        """Cached features of each image set; the missing ones are computed in one pass of the vision encoder."""
        keys = [s.digest() for s in sets]
        missing: dict[str, Any] = {}
        for key, s in zip(keys, sets):
            if key in self._features or key in missing:
                self.hits += s.n_images
            else:
                self.misses += s.n_images
                missing[key] = s
        if missing:
            todo = list(missing.values())
            merged = self.bundle.merge_tensors([s.tensors for s in todo])
            feats = self._compute(merged)
            start = 0
            for key, s in missing.items():
                self._features[key] = split_features(feats, start, start + s.n_images)
                self._counts[key] = s.n_images
                start += s.n_images
        return [self._features[k] for k in keys]

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """The bundle's batch with the pixel tensors replaced by cached image features."""
        batch, sets = self.bundle.collate_parts(samples)
        if sets:
            pixel_keys = set(self.bundle.loss_fn.pixel_keys)
            batch.update({k: v for k, v in self.bundle.batch_images(sets).items() if k not in pixel_keys})
            batch[FEATURES_KEY] = self.features(sets)
        return batch


def split_features(feats: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Images ``start:stop`` of per-image features (``pooler``: a list over images; ``deepstack``: a list over
    layers of lists over images)."""
    out: dict[str, Any] = {"pooler": list(feats["pooler"][start:stop])}
    if "deepstack" in feats:
        out["deepstack"] = [list(layer[start:stop]) for layer in feats["deepstack"]]
    return out


class CachedFeatureTask(CausalLMTask):
    """The bundle's loss on batches from :meth:`FrozenFeatureCache.collate`: the model gets the cached image
    features (through the projector when it trains) instead of pixels."""

    def __init__(self, inner: CausalLMTask, cache: FrozenFeatureCache) -> None:
        super().__init__(pixel_dtype=inner.pixel_dtype, input_keys=inner.input_keys, pixel_keys=inner.pixel_keys)
        self.inner, self.cache = inner, cache
        self._native: bool | None = None

    def supports_encoder_outputs(self) -> bool:
        """transformers ≥ 5 takes precomputed features as ``mm_encoder_outputs``; older ones get inputs_embeds."""
        if self._native is None:
            inner = self.cache.bundle.base_model().model
            self._native = "mm_encoder_outputs" in inspect.signature(inner.forward).parameters
        return self._native

    def model_inputs(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        inputs = self.inner.model_inputs(model, {k: v for k, v in batch.items() if k != FEATURES_KEY})
        feats = batch.get(FEATURES_KEY)
        if feats is None:
            return inputs
        feats = move_to(feats, model_device(model))
        fed = self.cache.bundle.features_inputs(feats, self.cache.level)
        if self.supports_encoder_outputs():
            inputs.update(fed)
            return inputs
        inner = self.cache.bundle.base_model().model
        flat = torch.cat(list(fed["mm_encoder_outputs"]["image"].pooler_output), dim=0)
        ids = inputs.pop("input_ids")
        embeds = inner.get_input_embeddings()(ids)
        mask = (ids == self.cache.bundle.image_token_id).unsqueeze(-1).expand_as(embeds)
        inputs["inputs_embeds"] = embeds.masked_scatter(mask, flat.to(embeds.dtype))
        return inputs


__all__ = ["CachedFeatureTask", "FEATURES_KEY", "FrozenFeatureCache", "LEVELS", "split_features"]
