"""LLaVA-style vision-language models (``transformers.LlavaForConditionalGeneration``, ``model_type="llava"``).

In transformers 5 the modules live at ``model.vision_tower``, ``model.multi_modal_projector`` and
``model.language_model`` (plus ``lm_head``). Image features are computed in ``LlavaModel.get_image_features``
(vision tower → projector) and scattered into the ``<image>`` token positions; with a frozen projector they do not
depend on the adapter, so :meth:`LlavaBundle.feature_cache` caches them and passes them back as ``mm_encoder_outputs``.
"""

from __future__ import annotations

from typing import Any

import torch

from mmerase.data import IMAGE_PLACEHOLDER, Sample
from mmerase.models.base import LoadOptions, ModelBundle

#: LoRA on the language model's projections only: anchored on ``language_model`` so the CLIP vision tower's
#: ``q_proj``/``k_proj``/``v_proj`` never match.
LLAVA_LM_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class LlavaBundle(ModelBundle):
    """A LLaVA checkpoint (vision tower + projector + language model) with its processor and chat template."""

    family = "llava"
    default_target_modules = LLAVA_LM_TARGETS
    projector_modules = ["multi_modal_projector"]
    #: transformers matches these from the start of the module name (or as a suffix): keep vision + projector full
    quant_skip_modules = [r".*vision_tower", r".*multi_modal_projector", "lm_head"]
    supports_images = True

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, processor, **kwargs)
        config = self._base_config()
        self.image_token_id = int(getattr(config, "image_token_id", None) or getattr(config, "image_token_index"))
        vision = config.vision_config
        self.patch_size = int(getattr(processor, "patch_size", None) or vision.patch_size)
        extra = getattr(processor, "num_additional_image_tokens", None)
        self.num_additional_image_tokens = int(1 if extra is None and vision.model_type.startswith("clip")
                                               else extra or 0)
        self.feature_select_strategy = (getattr(processor, "vision_feature_select_strategy", None)
                                        or config.vision_feature_select_strategy)

    def feature_cache(self) -> Any:
        """A :class:`~mmerase.models.feature_cache.FrozenFeatureCache` for the influence engine: projector outputs
        when vision tower and projector are frozen, vision tower outputs when only the projector trains, ``None``
        when the vision tower trains."""
        from mmerase.models.feature_cache import FrozenFeatureCache

        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if any(p.requires_grad for p in model.model.vision_tower.parameters()):
            return None
        trains_projector = any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
        return FrozenFeatureCache(self, "vision" if trains_projector else "projector")

    def _base_config(self) -> Any:
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return model.config

    @classmethod
    def _auto_model_class(cls) -> Any:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def _load_processor(cls, path: str, options: LoadOptions) -> tuple[Any, Any]:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, local_files_only=options.local_files_only)
        return processor.tokenizer, processor

    def _to_messages(self, sample: Sample) -> list[dict[str, Any]]:
        """LLaVA turns → typed content parts; ``<image>`` becomes an image part where it stood."""
        messages = []
        for role, text in sample.messages:
            parts: list[dict[str, Any]] = []
            if IMAGE_PLACEHOLDER in text:
                before, after = text.split(IMAGE_PLACEHOLDER, 1)
                if before.strip():
                    parts.append({"type": "text", "text": before.rstrip()})
                parts.append({"type": "image"})
                if after.strip():
                    parts.append({"type": "text", "text": after.lstrip()})
            else:
                parts.append({"type": "text", "text": text})
            messages.append({"role": role, "content": parts})
        return messages

    def _pixel_values(self, images: list[Any]) -> torch.Tensor:
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def num_image_tokens(self, height: int, width: int) -> int:
        """How many ``<image>`` positions one image of this size fills (as ``LlavaProcessor`` computes it)."""
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.feature_select_strategy == "default" else n

    def _expand_image_tokens(self, ids: list[int], labels: list[int], pixel_values: torch.Tensor | None,
                             ) -> tuple[list[int], list[int]]:
        if self.image_token_id not in ids:
            return ids, labels
        n = self.num_image_tokens(int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        out_ids, out_labels = [], []
        for t, lab in zip(ids, labels):
            if t == self.image_token_id:
                out_ids += [t] * n
                out_labels += [-100] * n
            else:
                out_ids.append(t)
                out_labels.append(lab)
        return out_ids, out_labels
