"""Any-resolution LLaVA: LLaVA-NeXT (``llava_next``) and LLaVA-OneVision (``llava_onevision``).

An image is tiled: a base crop of the whole image plus a grid of crops on the resolution (from the checkpoint's
``image_grid_pinpoints``) that fits it best. Its vision tokens are the base crop's patches, then the grid's patches
with the padding rows or columns of the letterboxed image removed, one learned newline token closing each row. So
the number of ``<image>`` positions depends on the image's size; :func:`anyres_token_count` counts them as the
model packs them (``pack_image_features``), and the model itself refuses a batch whose counts differ.

LLaVA-OneVision also caps the grid at ``anyres_max_N`` crops' worth of tokens (larger grids are resized down), and
a sample with several images gives each image only its base crop (padded to a square) plus one newline. Both use
the model's own modules: ``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``.

In transformers 5 LLaVA-NeXT's full processor needs no torchvision and is used; LLaVA-OneVision's needs it (its
video processor), so without torchvision the tokenizer and the image processor are loaded on their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from mmerase.models.llava import LLAVA_QUANT_SKIP, load_full_processor
from mmerase.models.loading import FamilySpec, LoadOptions
from mmerase.models.task import TEXT_INPUTS
from mmerase.models.vision import VisionBundle, pad_dim1


def _next_class() -> Any:
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration


def _onevision_class() -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration


def load_split_processor(path: str, options: LoadOptions) -> tuple[Any, Any]:
    """(tokenizer, processor) through ``AutoProcessor`` where it loads (its video processor needs torchvision),
    else (tokenizer, image processor) loaded on their own."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        tokenizer, processor = load_full_processor(path, options)
        if getattr(processor, "image_processor", None) is not None:
            return tokenizer, processor
    except (ImportError, AttributeError, ValueError, TypeError, OSError, KeyError):
        pass  # no torchvision: the tokenizer and image processor below are all mmerase needs
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=options.local_files_only)
    images = AutoImageProcessor.from_pretrained(path, local_files_only=options.local_files_only)
    return tokenizer, images


def unpadded_grid(orig_h: int, orig_w: int, cur_h: int, cur_w: int) -> tuple[int, int]:
    """The (rows, columns) of a ``cur_h`` × ``cur_w`` feature grid left after removing the letterbox padding of an
    ``orig_h`` × ``orig_w`` image (rounding as the model's ``unpad_image`` does)."""
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        return cur_h - 2 * ((cur_h - new_h) // 2), cur_w
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    return cur_h, cur_w - 2 * ((cur_w - new_w) // 2)


def anyres_token_count(orig_h: int, orig_w: int, pinpoints: Sequence[Sequence[int]], tile: int, side: int,
                       max_tiles: int | None = None) -> int:
    """Vision tokens of one tiled image: ``side``² for the base crop, the unpadded grid of ``side`` × ``side``
    patches per ``tile``-px crop, and one newline per grid row. ``max_tiles`` (LLaVA-OneVision's ``anyres_max_N``)
    shrinks a grid holding more than about that many crops' worth of patches."""
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution([orig_h, orig_w], [list(p) for p in pinpoints])
    rows, cols = unpadded_grid(orig_h, orig_w, side * (best_h // tile), side * (best_w // tile))
    if max_tiles is not None:
        ratio = math.sqrt(rows * cols / (max_tiles * side ** 2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return side * side + rows * cols + rows


class LlavaNextBundle(VisionBundle):
    """A LLaVA-NeXT checkpoint: CLIP-style vision tower, projector, newline embedding, language model."""

    family: ClassVar[str] = "llava_next"
    spec: ClassVar[FamilySpec] = FamilySpec("llava_next", _next_class,
                                            projector_modules=(r".*multi_modal_projector",),
                                            quant_skip_modules=LLAVA_QUANT_SKIP)
    model_input_keys: ClassVar[tuple[str, ...]] = TEXT_INPUTS + ("pixel_values", "image_sizes")

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, processor, **kwargs)
        config = self.base_model().config
        vision = config.vision_config
        self.pinpoints = [list(p) for p in (getattr(self.image_processor, "image_grid_pinpoints", None)
                                            or config.image_grid_pinpoints)]
        self.tile = int(vision.image_size)
        self.side = self.tile // int(vision.patch_size)
        self.strategy = config.vision_feature_select_strategy
        cls_token = getattr(processor, "num_additional_image_tokens", None)
        cls_token = int(vision.model_type.startswith("clip") if cls_token is None else cls_token)
        #: tokens beyond the patches: a kept CLS token, or one fewer when 'default' drops the first position
        self.extra = cls_token - (1 if self.strategy == "default" else 0)

    @classmethod
    def load_processor(cls, path: str, options: LoadOptions) -> tuple[Any, Any]:
        return load_split_processor(path, options)

    def process_image(self, image: Image.Image, n_images: int) -> dict[str, torch.Tensor]:
        out = self.image_processor(image, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def merge_tensors(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        merged = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0] if k != "pixel_values"}
        merged["pixel_values"] = pad_dim1([p["pixel_values"] for p in parts])
        return merged

    def token_counts(self, tensors: dict[str, torch.Tensor], n_images: int) -> list[int]:
        return [anyres_token_count(int(h), int(w), self.pinpoints, self.tile, self.side) + self.extra
                for h, w in tensors["image_sizes"].tolist()]


class LlavaOnevisionBundle(LlavaNextBundle):
    """A LLaVA-OneVision checkpoint: SigLIP vision tower, projector, newline embedding, Qwen2 language model."""

    family: ClassVar[str] = "llava_onevision"
    spec: ClassVar[FamilySpec] = FamilySpec("llava_onevision", _onevision_class,
                                            projector_modules=(r".*multi_modal_projector",),
                                            quant_skip_modules=LLAVA_QUANT_SKIP)
    model_input_keys: ClassVar[tuple[str, ...]] = LlavaNextBundle.model_input_keys + ("batch_num_images",)

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, processor, **kwargs)
        aspect = self.base_model().config.vision_aspect_ratio
        self.max_tiles = int(aspect.removeprefix("anyres_max_")) if aspect.startswith("anyres_max_") else None

    def process_image(self, image: Image.Image, n_images: int) -> dict[str, torch.Tensor]:
        """Tiled when the sample has one image; padded to a square, base crop only, when it has several (the
        processor decides by the images it sees together, so such an image is shown to it twice and kept once)."""
        out = self.image_processor([[image]] if n_images == 1 else [[image, image]], return_tensors="pt")
        return {"pixel_values": out["pixel_values"][:1], "image_sizes": out["image_sizes"][:1]}

    def sample_tensors(self, tensors: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
        return {**tensors, "batch_num_images": torch.tensor([n_images], dtype=torch.long)}

    def token_counts(self, tensors: dict[str, torch.Tensor], n_images: int) -> list[int]:
        extra = -1 if self.strategy == "default" else 0  # as LlavaOnevisionProcessor counts (no CLS token)
        if n_images > 1:
            return [self.side * self.side + 1 + extra] * n_images
        return [anyres_token_count(int(h), int(w), self.pinpoints, self.tile, self.side, self.max_tiles) + extra
                for h, w in tensors["image_sizes"].tolist()]


__all__ = ["LlavaNextBundle", "LlavaOnevisionBundle", "anyres_token_count", "load_split_processor",
           "unpadded_grid"]
