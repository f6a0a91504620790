"""The Qwen-VL line: Qwen2-VL (``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``) and Qwen3-VL (``qwen3_vl``).

Dynamic resolution: an image is resized to a multiple of (patch × merge) pixels within the processor's pixel
bounds, cut into patches (a flat ``[patches, channels × temporal × patch²]`` tensor, all images of a batch
concatenated) with its ``image_grid_thw`` = (1, rows, columns); the vision encoder's merger joins 2×2 patches, so
the image fills rows × columns / 4 ``<|image_pad|>`` positions. Positions are M-RoPE (time, height, width): the model
computes them from the ids, ``image_grid_thw``, ``mm_token_type_ids`` (1 on image tokens) and the attention mask,
so the batch carries no ``position_ids`` and padding never changes a sample's loss. Qwen3-VL also adds "deepstack"
features of intermediate vision layers to the first language-model layers; the feature cache keeps them too.

The vision encoder (``model.visual``) holds the projector (``visual.merger``; Qwen3-VL also
``visual.deepstack_merger_list``). In transformers 5 the Qwen-VL processors need torchvision (their video
processors), so without it the tokenizer and the image processor are loaded on their own.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from mmerase.models.llava_next import load_split_processor
from mmerase.models.loading import FamilySpec, LoadOptions
from mmerase.models.vision import VisionBundle

QWEN_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
QWEN_QUANT_SKIP = (r".*visual", "lm_head")
QWEN_PROJECTOR = (r".*visual\.merger",)
QWEN3_PROJECTOR = QWEN_PROJECTOR + (r".*visual\.deepstack_merger_list\.\d+",)


def _model_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def _qwen2_class() -> Any:
    return _model_class("Qwen2VLForConditionalGeneration")


def _qwen2_5_class() -> Any:
    return _model_class("Qwen2_5_VLForConditionalGeneration")


def _qwen3_class() -> Any:
    return _model_class("Qwen3VLForConditionalGeneration")


class Qwen2VLBundle(VisionBundle):
    """A Qwen2-VL checkpoint (and the base of the Qwen2.5-VL and Qwen3-VL bundles)."""

    family: ClassVar[str] = "qwen2_vl"
    spec: ClassVar[FamilySpec] = FamilySpec("qwen2_vl", _qwen2_class, projector_modules=QWEN_PROJECTOR,
                                            quant_skip_modules=QWEN_QUANT_SKIP)
    model_input_keys: ClassVar[tuple[str, ...]] = QWEN_INPUTS
    vision_module: ClassVar[str] = "visual"

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, processor, **kwargs)
        self.merge = int(self.base_model().config.vision_config.spatial_merge_size)

    @classmethod
    def load_processor(cls, path: str, options: LoadOptions) -> tuple[Any, Any]:
        return load_split_processor(path, options)

    def text_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Marks image tokens (``mm_token_type_ids``); the model derives M-RoPE positions from them."""
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).to(torch.int32)
        return batch

    def process_image(self, image: Image.Image, n_images: int) -> dict[str, torch.Tensor]:
        out = self.image_processor(image, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def token_counts(self, tensors: dict[str, torch.Tensor], n_images: int) -> list[int]:
        return [int(n) // self.merge ** 2 for n in tensors["image_grid_thw"].prod(-1).tolist()]

    def feature_cache(self) -> Any:
        """Projector (merger) outputs cached when the whole vision encoder is frozen and the model takes
        ``mm_encoder_outputs``; ``None`` otherwise."""
        inner = self.base_model().model
        if "mm_encoder_outputs" not in inspect.signature(inner.forward).parameters:
            return None
        return super().feature_cache()

    def image_features(self, tensors: dict[str, torch.Tensor], level: str) -> dict[str, Any]:
        out = self.base_model().model.get_image_features(**tensors, return_dict=True)
        feats: dict[str, Any] = {"pooler": [f.detach() for f in out.pooler_output]}
        deep = getattr(out, "deepstack_features", None)
        if deep is not None:
            feats["deepstack"] = [[f.detach() for f in layer] for layer in deep]
        return feats


class Qwen2_5_VLBundle(Qwen2VLBundle):
    """A Qwen2.5-VL checkpoint (windowed vision attention; otherwise as Qwen2-VL)."""

    family: ClassVar[str] = "qwen2_5_vl"
    spec: ClassVar[FamilySpec] = FamilySpec("qwen2_5_vl", _qwen2_5_class, projector_modules=QWEN_PROJECTOR,
                                            quant_skip_modules=QWEN_QUANT_SKIP)


class Qwen3VLBundle(Qwen2VLBundle):
    """A Qwen3-VL checkpoint (deepstack features of intermediate vision layers feed the first LM layers)."""

    family: ClassVar[str] = "qwen3_vl"
    spec: ClassVar[FamilySpec] = FamilySpec("qwen3_vl", _qwen3_class, projector_modules=QWEN3_PROJECTOR,
                                            quant_skip_modules=QWEN_QUANT_SKIP)

    def features_inputs(self, features: Sequence[dict[str, Any]], level: str) -> dict[str, Any]:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        pooler = [f for feats in features for f in feats["pooler"]]
        layers = len(features[0]["deepstack"])
        deep = [[f for feats in features for f in feats["deepstack"][k]] for k in range(layers)]
        out = BaseModelOutputWithDeepstackFeatures(pooler_output=pooler, deepstack_features=deep)
        return {"mm_encoder_outputs": {"image": out}}


__all__ = ["QWEN_INPUTS", "Qwen2VLBundle", "Qwen2_5_VLBundle", "Qwen3VLBundle"]
