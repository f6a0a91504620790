"""Text-only causal language models (any ``AutoModelForCausalLM`` checkpoint: Llama, Mistral, Qwen2, ...)."""

from __future__ import annotations

from typing import ClassVar

from mmerase.models.base import ModelBundle


class TextBundle(ModelBundle):
    """A causal LM with its tokenizer and chat template (a generic fallback template when it has none)."""

    family: ClassVar[str] = "text"
    supports_images: ClassVar[bool] = False


__all__ = ["TextBundle"]
