"""Text-only causal language models (any ``AutoModelForCausalLM`` checkpoint: Llama, Mistral, Qwen2, ...)."""

from __future__ import annotations

from typing import Any

from mmerase.data import Sample
from mmerase.models.base import ModelBundle


class TextBundle(ModelBundle):
    """A causal LM with its tokenizer and chat template (a generic fallback template when it has none)."""

    family = "text"
    supports_images = False

    @classmethod
    def _auto_model_class(cls) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def _to_messages(self, sample: Sample) -> list[dict[str, Any]]:
        return [{"role": role, "content": text} for role, text in sample.messages]
