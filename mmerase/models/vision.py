"""What image families share: images through the family's image processor, image tokens widened, batches merged.

Each image goes through the family's image processor on its own (so an image the processor cannot take is named in
the error), one sample's images form an :class:`ImageSet` (the processor's tensors plus how many vision tokens each
image fills), and a batch merges the sets of its samples. The chat template writes the image token once per image;
:meth:`VisionBundle.collate` widens it to the image's token count, which depends on the image's size for the
any-resolution families (LLaVA-NeXT, LLaVA-OneVision) and Qwen-VL's dynamic resolution.

A family subclass says how to process one image (:meth:`VisionBundle.process_image`), how many tokens an image
fills (:meth:`VisionBundle.token_counts`), how to merge processed tensors (:meth:`VisionBundle.merge_tensors`) and,
for the frozen-feature cache, how to compute and feed back one sample's image features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from mmerase.data import DataError, Sample, image_name, load_image_ref
from mmerase.fileio import shown
from mmerase.models.base import ModelBundle
from mmerase.models.encoding import pad_rows
from mmerase.models.loading import projector_module_names
from mmerase.models.task import IGNORE_INDEX


@dataclass
class ImageSet:
    """One sample's images after the image processor: model tensors (leading dimension: its images, except where a
    family says otherwise) and the vision tokens each image fills."""

    tensors: dict[str, torch.Tensor]
    tokens: list[int]

    @property
    def n_images(self) -> int:
        return len(self.tokens)

    def digest(self) -> str:
        """Exact content key (names, shapes, dtypes and bytes of every tensor)."""
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().cpu().contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            h.update((t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().tobytes())
        return h.hexdigest()


def pad_dim1(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0 after zero-padding dim 1 to the longest (any-resolution tiles per image)."""
    longest = max(int(t.shape[1]) for t in tensors)
    out = []
    for t in tensors:
        if t.shape[1] < longest:
            pad = t.new_zeros((t.shape[0], longest - t.shape[1], *t.shape[2:]))
            t = torch.cat([t, pad], dim=1)
        out.append(t)
    return torch.cat(out, dim=0)


def widen_image_tokens(ids: list[int], labels: list[int], image_token_id: int, tokens: Sequence[int],
                       ) -> tuple[list[int], list[int]]:
    """Replace the k-th image token by ``tokens[k]`` copies (never trained on)."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    k = 0
    for t, lab in zip(ids, labels):
        if t == image_token_id:
            out_ids += [t] * tokens[k]
            out_labels += [IGNORE_INDEX] * tokens[k]
            k += 1
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


class VisionBundle(ModelBundle):
    """A vision-language checkpoint with its image processor and chat template (see the module docstring)."""

    supports_images: ClassVar[bool] = True
    #: the module (attribute of the inner ``model.model``) that encodes images; the projector is ``spec``'s
    vision_module: ClassVar[str] = "vision_tower"

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any = None, **kwargs: Any) -> None:
        self.image_processor = getattr(processor, "image_processor", processor)
        super().__init__(model, tokenizer, processor, **kwargs)
        self.image_token_id = self.template_image_token_id()

    def template_image_token_id(self) -> int | None:
        config = self.base_model().config
        return int(getattr(config, "image_token_id", None) or getattr(config, "image_token_index"))

    # ---- family parts -----------------------------------------------------------------------------------------

    def process_image(self, image: Image.Image, n_images: int) -> dict[str, torch.Tensor]:
        """The image processor's tensors for one image (leading dimension 1) of a sample with ``n_images``."""
        raise NotImplementedError

    def merge_tensors(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Processed tensors of several images (or image sets) as one (default: concatenated along dim 0)."""
        return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}

    def token_counts(self, tensors: dict[str, torch.Tensor], n_images: int) -> list[int]:
        """How many vision tokens each of one sample's ``n_images`` images fills."""
        raise NotImplementedError

    # ---- images → tensors -------------------------------------------------------------------------------------

    def image_set(self, sample: Sample) -> ImageSet:
        """The sample's images through the image processor; an image it cannot take is a :class:`DataError`
        naming the sample and the file."""
        parts = []
        refs = sample.image_refs
        for ref in refs:
            image = load_image_ref(ref, f"sample {shown(sample.id)}: field 'image'")
            try:
                parts.append(self.process_image(image, len(refs)))
            except Exception as exc:  # processors raise ValueError, TypeError, ...: the message is what matters
                raise DataError(f"sample {shown(sample.id)}: image {image_name(ref)} ({image.width}×{image.height}) cannot "
                                f"be taken by the {self.family} image processor: {exc}") from exc
        tensors = self.sample_tensors(self.merge_tensors(parts), len(parts))
        return ImageSet(tensors, self.token_counts(tensors, len(parts)))

    def sample_tensors(self, tensors: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
        """Per-sample additions to the merged image tensors (e.g. LLaVA-OneVision's image count)."""
        return tensors

    def batch_images(self, sets: Sequence[ImageSet]) -> dict[str, torch.Tensor]:
        """The batch's image tensors (floating-point ones in the compute dtype)."""
        merged = self.merge_tensors([s.tensors for s in sets])
        return {k: v.to(self.compute_dtype) if v.is_floating_point() else v for k, v in merged.items()}

    # ---- batches ----------------------------------------------------------------------------------------------

    def collate_parts(self, samples: Sequence[Sample], for_generation: bool = False,
                      ) -> tuple[dict[str, torch.Tensor], list[ImageSet]]:
        """The padded text part of a batch (image tokens widened) and the image sets of its samples, in order."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        rows, sets = [], []
        for s in samples:
            enc = self.encode(s, for_generation)
            if s.has_image:
                sets.append(self.image_set(s))
                rows.append(widen_image_tokens(enc.input_ids, enc.labels, self.image_token_id, sets[-1].tokens))
            else:
                rows.append((enc.input_ids, enc.labels))
        return self.text_inputs(pad_rows(rows, self.pad_token_id, left=for_generation)), sets

    def collate(self, samples: Sequence[Sample], *, for_generation: bool = False) -> dict[str, torch.Tensor]:
        """Samples → padded batch dict: the text part (see :meth:`ModelBundle.collate`) and, when some sample has
        images, the family's image tensors for those samples in order."""
        batch, sets = self.collate_parts(samples, for_generation)
        if sets:
            batch.update(self.batch_images(sets))
        return batch

    # ---- frozen features (see .feature_cache) -----------------------------------------------------------------

    def image_modules(self) -> tuple[nn.Module, list[nn.Module]]:
        """(the vision encoder, the projector modules), projector modules possibly inside the encoder."""
        base = self.base_model()
        names = set(projector_module_names(self.spec, base))
        return getattr(base.model, self.vision_module), [m for n, m in base.named_modules() if n in names]

    def vision_frozen(self) -> tuple[bool, bool]:
        """(vision encoder frozen, projector frozen) in the current adapter."""
        vision, projectors = self.image_modules()
        proj_params = {id(p) for m in projectors for p in m.parameters()}
        vision_trains = any(p.requires_grad for p in vision.parameters() if id(p) not in proj_params)
        projector_trains = any(p.requires_grad for m in projectors for p in m.parameters())
        return not vision_trains, not projector_trains

    def feature_cache(self) -> Any:
        """A :class:`~mmerase.models.feature_cache.FrozenFeatureCache` of projector outputs when the vision encoder
        and the projector are frozen; ``None`` otherwise (families override where they can cache more)."""
        from mmerase.models.feature_cache import FrozenFeatureCache

        vision_frozen, projector_frozen = self.vision_frozen()
        return FrozenFeatureCache(self, "projector") if vision_frozen and projector_frozen else None

    def image_features(self, tensors: dict[str, torch.Tensor], level: str) -> dict[str, Any]:
        """Features of (merged) image sets as the model computes them (no grad; inputs on the model's device):
        ``{"pooler": [one tensor per image], ...}``. Level 'projector': the projector's output."""
        out = self.base_model().model.get_image_features(**tensors, return_dict=True)
        return {"pooler": [f.detach() for f in out.pooler_output]}

    def features_inputs(self, features: Sequence[dict[str, Any]], level: str) -> dict[str, Any]:
        """Model keyword arguments that feed the batch's cached features (in image-set order) in place of pixels."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooler = [f for feats in features for f in feats["pooler"]]
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pooler)}}


__all__ = ["ImageSet", "VisionBundle", "pad_dim1", "widen_image_tokens"]
