"""Pick the model family from a checkpoint's ``config.json`` (``model_type``) and load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmerase.fileio import shown
from mmerase.models.base import ModelBundle
from mmerase.models.gguf import GGUF_PRESETS, gguf_checkpoint, gguf_file_of, preset_gguf
from mmerase.models.loading import LoadOptions, LoraSettings, ModelLoadError
from mmerase.models.llava import LlavaBundle
from mmerase.models.llava_next import LlavaNextBundle, LlavaOnevisionBundle
from mmerase.models.presets import PRESETS, preset_path
from mmerase.models.qwen_vl import Qwen2_5_VLBundle, Qwen2VLBundle, Qwen3VLBundle
from mmerase.models.text import TextBundle

#: model_type → family; any other model type that ``AutoModelForCausalLM`` knows is served by :class:`TextBundle`
FAMILIES: dict[str, type[ModelBundle]] = {
    b.family: b for b in (LlavaBundle, LlavaNextBundle, LlavaOnevisionBundle, Qwen2VLBundle, Qwen2_5_VLBundle,
                          Qwen3VLBundle)}


def register_family(model_type: str, family: type[ModelBundle]) -> None:
    """Serve checkpoints whose ``config.model_type`` is ``model_type`` with ``family``."""
    FAMILIES[model_type] = family


def family_for(config: Any) -> type[ModelBundle]:
    """The family class for a transformers config."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return TextBundle
    raise ModelLoadError(f"unsupported model_type {shown(model_type)}: mmerase serves {', '.join(sorted(FAMILIES))} "
                         "and text causal LMs (AutoModelForCausalLM)")


def resolve_base(name_or_path: str | Path, seed: int = 0) -> str:
    """A preset name (built or converted locally on first use), a GGUF file (or a folder holding one, converted
    once: :mod:`.gguf`), a local checkpoint folder or a hub id → what to load."""
    name = str(name_or_path)
    if name in PRESETS:
        return str(preset_path(name, seed=seed))
    if name in GGUF_PRESETS:
        return str(gguf_checkpoint(preset_gguf(name)))
    found = gguf_file_of(name)
    return name if found is None else str(gguf_checkpoint(found))


def load_model(base: str | Path, *, adapter: str | Path | None = None, lora: LoraSettings | None = None,
               options: LoadOptions | None = None, preset_seed: int = 0) -> ModelBundle:
    """Load ``base`` (preset name, folder or hub id) with a peft ``adapter`` folder or a new LoRA (``lora``)."""
    from transformers import AutoConfig

    options = options or LoadOptions()
    path = resolve_base(base, seed=preset_seed)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model checkpoint folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=options.local_files_only)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of base model {path!r}: {exc}") from exc
    return family_for(config).load(path, adapter=adapter, lora=lora, options=options)
