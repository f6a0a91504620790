"""Tiny checkpoints built from configs (no download) for tests and the CPU demo.

``tiny-llava``: CLIP-style vision tower (64-d, 2 layers, 16×16 images, patch 4 → 16 image tokens) + projector +
Llama-style LM (128-d, 2 layers); ``tiny-llama``: the same LM alone. Both use a byte-level tokenizer (the 256 bytes
plus special tokens, so any UTF-8 text encodes) and a chat template, and are written with ``save_pretrained`` so
they load through exactly the code path a real ``llava-hf`` or Llama checkpoint uses. ``tiny-llava-next``,
``tiny-llava-onevision``, ``tiny-qwen2-vl``, ``tiny-qwen2.5-vl`` and ``tiny-qwen3-vl`` are described in
:mod:`.tiny_vlms`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmerase.models.tiny_vlms import BUILDERS
from mmerase.models.tokenizer import SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, build_byte_tokenizer

PRESETS = ("tiny-llava", "tiny-llama") + tuple(BUILDERS)

#: The output head is initialised ×HEAD_SCALE: with std 0.02 and unit-RMS 128-d hidden states a frozen random
#: head cannot produce logits above ~2.6, so LoRA could never make a confident prediction (a trained LM's head can).
HEAD_SCALE = 8.0


def _text_config(tok: Any, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _llava_or_llama(name: str, **text_overrides: Any) -> tuple[Any, Any, Any, Any]:
    """(model, tokenizer, image processor, processor) of ``tiny-llava`` / ``tiny-llama`` with random weights."""
    from transformers import (CLIPVisionConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    try:  # transformers ≥ 5: the PIL backend (no torchvision needed)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    tok = build_byte_tokenizer()
    text_config = _text_config(tok, **text_overrides)
    if name == "tiny-llama":
        return LlamaForCausalLM(text_config), tok, None, None
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=4, projection_dim=64)
    config = LlavaConfig(vision_config=vision, text_config=text_config,
                         image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=(16 // 4) ** 2,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    image_processor = ImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=TINY_CHAT_TEMPLATE)
    return LlavaForConditionalGeneration(config), tok, image_processor, processor


def build_preset(name: str, out_dir: str | Path, seed: int = 0, **text_overrides: Any) -> Path:
    """Build preset ``name`` with random weights (seeded) and save it like a hub checkpoint into ``out_dir``.

    ``text_overrides`` change the language model's config of ``tiny-llava`` / ``tiny-llama`` (e.g.
    ``hidden_size=64``: a base that other adapters do not fit).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if text_overrides and name in BUILDERS:
        raise ValueError(f"preset {name!r} takes no language-model overrides")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, tok, images, processor = BUILDERS[name]() if name in BUILDERS else _llava_or_llama(
            name, **text_overrides)
    for part in (tok, images, processor):
        if part is not None:
            part.save_pretrained(out_dir)
    with torch.no_grad():  # a frozen random head at std 0.02 caps the logits near 2.6: widen it (see docstring)
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


def cache_dir() -> Path:
    """Where presets asked for by name are built: ``$MMERASE_CACHE`` or ``~/.cache/mmerase``."""
    return Path(os.environ.get("MMERASE_CACHE", Path.home() / ".cache" / "mmerase"))


def preset_path(name: str, seed: int = 0) -> Path:
    """The folder of preset ``name`` (built on first use; a finished build is moved into place atomically)."""
    target = cache_dir() / "presets" / f"{name}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_preset(name, tmp, seed=seed)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


__all__ = ["HEAD_SCALE", "PRESETS", "SPECIAL_TOKENS", "TINY_CHAT_TEMPLATE", "build_byte_tokenizer", "build_preset",
           "cache_dir", "preset_path"]
