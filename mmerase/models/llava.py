"""LLaVA-1.5-style vision-language models (``transformers.LlavaForConditionalGeneration``, ``model_type="llava"``).

In transformers 5 the modules live at ``model.vision_tower``, ``model.multi_modal_projector`` and
``model.language_model`` (plus ``lm_head``). Each image is resized to one fixed size and fills a fixed number of
``<image>`` positions; features come from ``LlavaModel.get_image_features`` (vision tower → projector). With a
trainable projector the feature cache keeps the vision tower's output and runs the projector in every forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from mmerase.models.loading import LM_TARGETS, FamilySpec, LoadOptions
from mmerase.models.task import TEXT_INPUTS
from mmerase.models.vision import VisionBundle

#: LoRA on the language model's projections only (never the CLIP vision tower's q/k/v)
LLAVA_LM_TARGETS = LM_TARGETS
#: transformers matches these from the start of the module name (or as a suffix): keep vision + projector full
LLAVA_QUANT_SKIP = (r".*vision_tower", r".*multi_modal_projector", "lm_head")


def _llava_class() -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def load_full_processor(path: str, options: LoadOptions) -> tuple[Any, Any]:
    """(tokenizer, processor) through ``AutoProcessor`` (families whose processor needs no torchvision)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=options.local_files_only)
    return processor.tokenizer, processor


class LlavaBundle(VisionBundle):
    """A LLaVA checkpoint (vision tower + projector + language model) with its processor and chat template."""

    family: ClassVar[str] = "llava"
    spec: ClassVar[FamilySpec] = FamilySpec("llava", _llava_class, projector_modules=(r".*multi_modal_projector",),
                                            quant_skip_modules=LLAVA_QUANT_SKIP)
    model_input_keys: ClassVar[tuple[str, ...]] = TEXT_INPUTS + ("pixel_values",)

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, processor, **kwargs)
        config = self.base_model().config
        vision = config.vision_config
        self.patch_size = int(getattr(processor, "patch_size", None) or vision.patch_size)
        extra = getattr(processor, "num_additional_image_tokens", None)
        self.num_additional_image_tokens = int(1 if extra is None and vision.model_type.startswith("clip")
                                               else extra or 0)
        self.feature_select_strategy = (getattr(processor, "vision_feature_select_strategy", None)
                                        or config.vision_feature_select_strategy)

    @classmethod
    def load_processor(cls, path: str, options: LoadOptions) -> tuple[Any, Any]:
        return load_full_processor(path, options)

    def process_image(self, image: Image.Image, n_images: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.image_processor(image, return_tensors="pt")["pixel_values"]}

    def num_image_tokens(self, height: int, width: int) -> int:
        """How many ``<image>`` positions one image of this (processed) size fills, as ``LlavaProcessor`` counts."""
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.feature_select_strategy == "default" else n

    def token_counts(self, tensors: dict[str, torch.Tensor], n_images: int) -> list[int]:
        pv = tensors["pixel_values"]
        return [self.num_image_tokens(int(pv.shape[-2]), int(pv.shape[-1]))] * n_images

    def feature_cache(self) -> Any:
        """Projector outputs cached when vision tower and projector are frozen, vision tower outputs when only the
        projector trains, ``None`` when the vision tower trains."""
        from mmerase.models.feature_cache import FrozenFeatureCache

        vision_frozen, projector_frozen = self.vision_frozen()
        if not vision_frozen:
            return None
        return FrozenFeatureCache(self, "projector" if projector_frozen else "vision")

    def image_features(self, tensors: dict[str, torch.Tensor], level: str) -> dict[str, Any]:
        inner = self.base_model().model
        captured: list[torch.Tensor] = []
        handle = None
        if level == "vision":  # the projector's input is the vision tower's selected output
            handle = inner.multi_modal_projector.register_forward_pre_hook(
                lambda _m, args: captured.append(args[0].detach()))
        try:
            out = inner.get_image_features(**tensors, return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
        if level == "vision":
            return {"pooler": list(captured[0])}
        return {"pooler": [f.detach() for f in out.pooler_output]}

    def features_inputs(self, features: Sequence[dict[str, Any]], level: str) -> dict[str, Any]:
        if level == "vision":
            projector = self.base_model().model.multi_modal_projector
            features = [{"pooler": list(projector(torch.stack(f["pooler"])))} for f in features]
        return super().features_inputs(features, "projector")


__all__ = ["LLAVA_LM_TARGETS", "LLAVA_QUANT_SKIP", "LlavaBundle", "load_full_processor"]
