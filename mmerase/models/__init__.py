"""Model families behind one interface (:class:`ModelBundle`): LLaVA-style VLMs and text causal LMs."""

from mmerase.models.base import (AdapterMismatchError, CausalLMTask, LoadOptions, LoraSettings, ModelBundle,
                                 ModelLoadError, TemplateError, load_adapter, per_sample_losses)
from mmerase.models.llava import LlavaBundle
from mmerase.models.presets import PRESETS, build_byte_tokenizer, build_preset, preset_path
from mmerase.models.registry import FAMILIES, family_for, load_model, register_family, resolve_base
from mmerase.models.text import TextBundle

__all__ = [
    "AdapterMismatchError", "CausalLMTask", "FAMILIES", "LlavaBundle", "LoadOptions", "LoraSettings", "ModelBundle",
    "ModelLoadError", "PRESETS", "TemplateError", "TextBundle", "build_byte_tokenizer", "build_preset",
    "family_for", "load_adapter", "load_model", "per_sample_losses", "preset_path", "register_family",
    "resolve_base",
]
