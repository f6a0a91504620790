"""Frozen-feature caching for LLaVA-style models: compute each image's features once, not in every product.

With the default LoRA (language model only) the vision tower and the projector are frozen, so an image's features
never change while the engine multiplies by the curvature tens of times over the same training images. The cache
keys features by the exact pixel tensor the collate produced (a digest of its bytes), so a cached batch gives the
same logits as recomputing the features, whatever the image source. With a trainable projector only the vision
tower's output is cached and the projector runs, with gradients, inside every forward. A trainable vision tower
means nothing can be cached (:meth:`LlavaBundle.feature_cache` returns ``None``).

The engine stays model-agnostic: it gets :attr:`FrozenFeatureCache.collate` and :attr:`FrozenFeatureCache.loss_fn`
in place of the bundle's own.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmerase.data import Sample
from mmerase.models.base import CausalLMTask

FEATURES_KEY = "image_features"


def _digest(pixels: torch.Tensor) -> str:
    """Exact content key of one image's pixel tensor (shape, dtype and bytes)."""
    t = pixels.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update((t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().tobytes())
    return h.hexdigest()


class FrozenFeatureCache:
    """Image features of a LLaVA bundle by pixel content; ``level`` is 'projector' (projector output cached) or
    'vision' (vision tower output cached, projector recomputed because it trains).

    Every distinct image seen stays cached on the model's device (images × tokens × width values: 4.7 MB per image
    for LLaVA-1.5-7B in bf16), so one cache serves one solve or a few; :meth:`clear` frees it.
    """

    def __init__(self, bundle: Any, level: str) -> None:
        if level not in ("projector", "vision"):
            raise ValueError(f"unknown feature cache level {level!r}; use 'projector' or 'vision'")
        self.bundle, self.level = bundle, level
        self._features: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.loss_fn = CachedFeatureTask(bundle.loss_fn, self)

    # ---- the model's parts
    @property
    def llava(self) -> nn.Module:
        """The ``LlavaModel`` (vision tower, projector, language model) inside the peft wrapper."""
        model = self.bundle.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.model

    @property
    def n_images(self) -> int:
        """How many distinct images have features cached."""
        return len(self._features)

    def clear(self) -> None:
        self._features.clear()

    # ---- computing and looking up features
    @torch.no_grad()
    def _compute(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features of a stack of images, in eval mode (as the engine's products run): [n_images, tokens, dim]."""
        llava = self.llava
        parts = (llava.vision_tower, llava.multi_modal_projector)
        modes = [(m, m.training) for p in parts for m in p.modules()]
        captured: list[torch.Tensor] = []
        handle = None
        if self.level == "vision":  # the projector's input is the vision tower's selected output
            handle = llava.multi_modal_projector.register_forward_pre_hook(
                lambda _m, args: captured.append(args[0].detach()))
        try:
            for p in parts:
                p.eval()
            out = llava.get_image_features(pixel_values=pixel_values, return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
            for m, t in modes:
                m.training = t
        if self.level == "vision":
            return captured[0]
        return torch.stack(list(out.pooler_output))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Cached features for each row of ``pixel_values`` (computing the missing ones in one batch)."""
        keys = [_digest(row) for row in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self._features]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            device = next(self.llava.parameters()).device
            pv = pixel_values[missing].to(device)
            if self.bundle.loss_fn.pixel_dtype is not None:
                pv = pv.to(self.bundle.loss_fn.pixel_dtype)
            for i, f in zip(missing, self._compute(pv)):
                self._features[keys[i]] = f
        return torch.stack([self._features[k] for k in keys])

    def collate(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """The bundle's batch with ``pixel_values`` replaced by cached ``image_features``."""
        batch = self.bundle.collate(samples)
        pixel_values = batch.pop("pixel_values", None)
        if pixel_values is not None:
            batch[FEATURES_KEY] = self.features(pixel_values)
        return batch


class CachedFeatureTask(CausalLMTask):
    """The bundle's loss on batches from :meth:`FrozenFeatureCache.collate`: the model gets the cached image
    features (through the projector when it trains) instead of pixels."""

    def __init__(self, inner: CausalLMTask, cache: FrozenFeatureCache) -> None:
        super().__init__(pixel_dtype=inner.pixel_dtype)
        self.inner, self.cache = inner, cache
        self._native: bool | None = None

    def _supports_encoder_outputs(self) -> bool:
        """transformers ≥ 5 takes precomputed features as ``mm_encoder_outputs``; older ones get inputs_embeds."""
        if self._native is None:
            self._native = "mm_encoder_outputs" in inspect.signature(self.cache.llava.forward).parameters
        return self._native

    def model_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        inputs = self.inner.model_inputs(model, {k: v for k, v in batch.items() if k != FEATURES_KEY})
        feats = batch.get(FEATURES_KEY)
        if feats is None:
            return inputs
        llava = self.cache.llava
        if self.cache.level == "vision":
            feats = llava.multi_modal_projector(feats)
        if self._supports_encoder_outputs():
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
            return inputs
        ids = inputs.pop("input_ids")
        embeds = llava.get_input_embeddings()(ids)
        mask = (ids == llava.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        inputs["inputs_embeds"] = embeds.masked_scatter(mask, feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        return inputs


__all__ = ["CachedFeatureTask", "FEATURES_KEY", "FrozenFeatureCache"]
