"""Tiny LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints built from configs (no download).

Each has a 2-layer vision encoder (32-d, 4-px patches), the family's projector, a 2-layer 64-d language model and
the byte-level tokenizer of :mod:`.tokenizer`, 150–200 thousand parameters in all. The image processors are the
families' own (PIL backends): LLaVA-NeXT / OneVision tile an image into 16-px crops on a grid chosen from
16/32/48-px pinpoints, Qwen-VL resizes it to a multiple of 8 px (4-px patches merged 2×2) between 16×16 and 64×64
pixels, so images of 28–56 px give different numbers of vision tokens. A preset is written with
``save_pretrained`` (model, tokenizer with its chat template, image processor; LLaVA-NeXT also its full processor),
so it loads through the code path of a downloaded checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmerase.models.tokenizer import (TINY_CHAT_TEMPLATE, build_byte_tokenizer, build_qwen_tokenizer,
                                      SPECIAL_TOKENS)

#: (height, width) grids LLaVA-NeXT / OneVision may tile an image into (16-px crops)
TINY_PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]
#: Qwen-VL resize bounds (pixels): 16×16 to 64×64
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 16 * 16, 64 * 64


def _lm_kwargs(tok: Any) -> dict[str, Any]:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _llava_next() -> tuple[Any, Any, Any, Any]:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = build_byte_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**_lm_kwargs(tok)),
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=TINY_PINPOINTS, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_seq_length=16)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                        image_grid_pinpoints=TINY_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=4,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=TINY_CHAT_TEMPLATE)
    return LlavaNextForConditionalGeneration(config), tok, images, processor


def _llava_onevision() -> tuple[Any, Any, Any, Any]:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    tok = build_byte_tokenizer(special_tokens=SPECIAL_TOKENS + ["<video>"],
                               extra={"image_token": "<image>", "video_token": "<video>"})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=4)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**_lm_kwargs(tok)),
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=TINY_PINPOINTS, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    images = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=TINY_PINPOINTS)
    return LlavaOnevisionForConditionalGeneration(config), tok, images, None


def _qwen_images() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=QWEN_MIN_PIXELS,
                                    max_pixels=QWEN_MAX_PIXELS)


def _qwen_config(config_cls: Any, text_cls: Any, vision: Any, tok: Any, **text: Any) -> Any:
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    rope.update(text.pop("rope", {}))
    kwargs = {k: v for k, v in _lm_kwargs(tok).items() if k != "max_position_embeddings"}
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return config_cls(vision_config=vision, text_config=text_cls(**kwargs, rope_parameters=rope, **text), **ids)


def _qwen2_vl() -> tuple[Any, Any, Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLTextConfig, Qwen2VLVisionConfig

    tok = build_qwen_tokenizer()
    vision = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                                 spatial_merge_size=2, temporal_patch_size=2)
    config = _qwen_config(Qwen2VLConfig, Qwen2VLTextConfig, vision, tok)
    return Qwen2VLForConditionalGeneration(config), tok, _qwen_images(), None


def _qwen2_5_vl() -> tuple[Any, Any, Any, Any]:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLTextConfig,
                              Qwen2_5_VLVisionConfig)

    tok = build_qwen_tokenizer()
    vision = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                                    patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                                    fullatt_block_indexes=[1])
    config = _qwen_config(Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, vision, tok)
    return Qwen2_5_VLForConditionalGeneration(config), tok, _qwen_images(), None


def _qwen3_vl() -> tuple[Any, Any, Any, Any]:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLTextConfig, Qwen3VLVisionConfig

    tok = build_qwen_tokenizer()
    vision = Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                                 patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                 num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = _qwen_config(Qwen3VLConfig, Qwen3VLTextConfig, vision, tok, head_dim=16,
                          rope={"mrope_interleaved": True})
    return Qwen3VLForConditionalGeneration(config), tok, _qwen_images(), None


#: preset name → builder returning (model with random weights, tokenizer, image processor, full processor or None)
BUILDERS: dict[str, Callable[[], tuple[Any, Any, Any, Any]]] = {
    "tiny-llava-next": _llava_next,
    "tiny-llava-onevision": _llava_onevision,
    "tiny-qwen2-vl": _qwen2_vl,
    "tiny-qwen2.5-vl": _qwen2_5_vl,
    "tiny-qwen3-vl": _qwen3_vl,
}

__all__ = ["BUILDERS", "QWEN_MAX_PIXELS", "QWEN_MIN_PIXELS", "TINY_PINPOINTS"]
