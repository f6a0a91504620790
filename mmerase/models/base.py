"""The one interface every model family implements, so the influence engine never knows which family it serves.

A :class:`ModelBundle` is a small facade over three parts: loading (:mod:`.loading`: base, NF4, LoRA, adapters),
encoding (:mod:`.encoding`: chat template → ids and labels, padding) and the task (:mod:`.task`: the loss). It
holds a peft model (base frozen, adapter trainable) and offers:

- ``bundle.model``: the ``PeftModel`` (the engine's ``model``; trainable parameters = the adapter),
- ``bundle.collate(samples) -> batch``: the engine's ``collate_fn``,
- ``bundle.loss_fn``: a :class:`~mmerase.models.task.CausalLMTask` (the engine's ``loss_fn``; mean over samples of
  each sample's mean response-token cross-entropy),
- ``bundle.generate(samples)``: batched greedy answers, ``bundle.save_adapter(dir)``: peft adapter folder.

Families differ in how they load (:class:`~mmerase.models.loading.FamilySpec`) and how images enter the batch
(:class:`~mmerase.models.vision.VisionBundle` and its subclasses); text models use :class:`ModelBundle` as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmerase.data import DataError, Sample
from mmerase.fileio import shown
from mmerase.models.encoding import ChatEncoder, Encoded, TemplateError, chat_template_of, pad_rows
from mmerase.models.loading import (AdapterMismatchError, FamilySpec, LoadOptions, LoraSettings, ModelLoadError,
                                    TEXT_TARGETS, keep_checkpointing_in_products, load_adapter, load_peft_model,
                                    read_adapter_config, upcast_trainable)
from mmerase.models.task import IGNORE_INDEX, TEXT_INPUTS, CausalLMTask, per_sample_losses


def _auto_causal_lm() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


class ModelBundle:
    """A loaded base + peft adapter and everything needed to feed it samples (see the module docstring).

    This class serves text causal LMs; image families subclass :class:`~mmerase.models.vision.VisionBundle`.
    """

    family: ClassVar[str] = "text"
    spec: ClassVar[FamilySpec] = FamilySpec("text", _auto_causal_lm, lora_targets=TEXT_TARGETS)
    supports_images: ClassVar[bool] = False
    #: batch entries the model is called with
    model_input_keys: ClassVar[tuple[str, ...]] = TEXT_INPUTS

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any = None, *, base_path: str | Path = "",
                 options: LoadOptions | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.base_path = str(base_path)
        self.options = options or LoadOptions()
        self.compute_dtype = self.options.torch_dtype()
        self.loss_fn = CausalLMTask(pixel_dtype=self.compute_dtype if self.supports_images else None,
                                    input_keys=self.model_input_keys)
        self.pad_token_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        self.encoder = ChatEncoder(tokenizer, chat_template_of(processor, tokenizer),
                                   image_token_id=self.template_image_token_id(), typed=self.supports_images,
                                   name=self.base_path)

    # ---- loading ----------------------------------------------------------------------------------------------

    @classmethod
    def load_processor(cls, path: str, options: LoadOptions) -> tuple[Any, Any]:
        """(tokenizer, processor-or-None) of the checkpoint."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=options.local_files_only), None

    @classmethod
    def load(cls, path: str | Path, *, adapter: str | Path | None = None, lora: LoraSettings | None = None,
             options: LoadOptions | None = None) -> "ModelBundle":
        """Load the base at ``path``, then load the peft ``adapter`` folder or attach a new LoRA (``lora``)."""
        options = options or LoadOptions()
        path = str(path)
        tokenizer, processor = cls.load_processor(path, options)
        model = load_peft_model(cls.spec, path, options, adapter=adapter, lora=lora)
        return cls(model, tokenizer, processor, base_path=path, options=options)

    def base_model(self) -> nn.Module:
        """The transformers model inside the peft wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    # ---- encoding and batches ---------------------------------------------------------------------------------

    def template_image_token_id(self) -> int | None:
        """The token the chat template writes once per image (image families)."""
        return None

    def encode(self, sample: Sample, for_generation: bool = False) -> Encoded:
        """Token ids and labels of one sample (see :meth:`~mmerase.models.encoding.ChatEncoder.encode`)."""
        if sample.has_image and not self.supports_images:
            raise DataError(f"sample {shown(sample.id)} has an image but model family {self.family!r} is text-only")
        return self.encoder.encode(sample, for_generation)

    def text_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adds ``position_ids`` counting real tokens only, so padding never changes a sample's loss or answer."""
        batch["position_ids"] = (batch["attention_mask"].cumsum(dim=1) - 1).clamp_min(0)
        return batch

    def collate(self, samples: Sequence[Sample], *, for_generation: bool = False) -> dict[str, torch.Tensor]:
        """Samples → padded batch dict (``input_ids``, ``attention_mask``, ``position_ids``, ``labels``).

        Training batches are right-padded, generation prompts left-padded.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        rows = [(e.input_ids, e.labels) for e in (self.encode(s, for_generation) for s in samples)]
        return self.text_inputs(pad_rows(rows, self.pad_token_id, left=for_generation))

    def batches(self, samples: Sequence[Sample], batch_size: int) -> list[list[Sample]]:
        return [list(samples[i: i + batch_size]) for i in range(0, len(samples), batch_size)]

    # ---- conveniences -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def per_sample_losses(self, samples: Sequence[Sample], batch_size: int = 8) -> torch.Tensor:
        """L(z) of each sample under the current adapter (float64 CPU tensor, one entry per sample)."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = [self.loss_fn.per_sample_losses(self.model, self.collate(chunk)).double().cpu()
                   for chunk in self.batches(samples, batch_size)]
        finally:
            self.model.train(was_training)
        return torch.cat(out)

    def feature_cache(self) -> Any:
        """A cache of frozen features for the influence engine (``.collate``/``.loss_fn`` replace the bundle's), or
        ``None`` when the family has nothing frozen worth caching (text models; see :mod:`.feature_cache`)."""
        return None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter (what the engine edits): ``{name: parameter}`` with ``requires_grad=True``."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def generate(self, samples: Sequence[Sample], *, max_new_tokens: int = 16, batch_size: int = 8,
                 progress: bool | None = None) -> list[str]:
        """Greedy answers to each sample's last user turn (batched, left-padded), special tokens stripped."""
        from mmerase.generation import generate_answers

        return generate_answers(self, samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress)

    def save_adapter(self, out_dir: str | Path) -> Path:
        """Write the adapter as a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out_dir), safe_serialization=True)
        return out_dir


__all__ = [
    "AdapterMismatchError", "CausalLMTask", "Encoded", "IGNORE_INDEX", "LoadOptions", "LoraSettings", "ModelBundle",
    "ModelLoadError", "TemplateError", "keep_checkpointing_in_products", "load_adapter", "per_sample_losses",
    "read_adapter_config", "upcast_trainable",
]
