"""Model families behind one interface (:class:`ModelBundle`): vision-language models (LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and text causal LMs."""

from mmerase.models.base import ModelBundle
from mmerase.models.encoding import TemplateError
from mmerase.models.llava import LlavaBundle
from mmerase.models.llava_next import LlavaNextBundle, LlavaOnevisionBundle
from mmerase.models.loading import AdapterMismatchError, LoadOptions, LoraSettings, ModelLoadError, load_adapter
from mmerase.models.presets import PRESETS, build_byte_tokenizer, build_preset, preset_path
from mmerase.models.qwen_vl import Qwen2_5_VLBundle, Qwen2VLBundle, Qwen3VLBundle
from mmerase.models.registry import FAMILIES, family_for, load_model, register_family, resolve_base
from mmerase.models.task import CausalLMTask, per_sample_losses
from mmerase.models.text import TextBundle
from mmerase.models.vision import VisionBundle

__all__ = [
    "AdapterMismatchError", "CausalLMTask", "FAMILIES", "LlavaBundle", "LlavaNextBundle", "LlavaOnevisionBundle",
    "LoadOptions", "LoraSettings", "ModelBundle", "ModelLoadError", "PRESETS", "Qwen2VLBundle", "Qwen2_5_VLBundle",
    "Qwen3VLBundle", "TemplateError", "TextBundle", "VisionBundle", "build_byte_tokenizer",
    "build_preset", "family_for", "load_adapter", "load_model", "per_sample_losses", "preset_path",
    "register_family", "resolve_base",
]
