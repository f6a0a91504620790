"""Float64 that is really float64.

transformers' eager attention computes its softmax in float32 and Llama-style RMSNorms normalise in float32, whatever
the model's dtype. In a float64 model those casts round parameter-dependent values to float32 (~1e-7), which breaks
float64 exactness checks: finite-difference Hessians become noisy and padding changes a sample's loss at 1e-9. For
float64 models of the families below, mmerase uses an eager attention whose softmax runs in the input dtype (at least
float32, so lower precisions behave exactly as transformers' eager) and RMSNorms that stay in float64.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

EXACT_ATTENTION = "mmerase_eager"

#: model types whose eager attention is the plain softmax(QKᵀ·scale + mask)·V that :func:`exact_eager_attention`
#: reproduces (no soft-capping, sinks or sliding windows)
EXACT_MODEL_TYPES = {"llava", "llava_next", "llava_onevision", "llama", "mistral", "qwen2", "qwen3",
                     "clip_vision_model", "clip", "siglip_vision_model", "siglip",
                     "qwen2_vl", "qwen2_vl_text", "qwen2_vl_vision", "qwen2_5_vl", "qwen2_5_vl_text",
                     "qwen2_5_vl_vision", "qwen3_vl", "qwen3_vl_text", "qwen3_vl_vision"}

#: RMSNorm classes with Llama's formula ``weight * x / sqrt(mean(x²) + eps)``
_LLAMA_STYLE_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2VLRMSNorm",
                      "Qwen2_5_VLRMSNorm", "Qwen3VLTextRMSNorm"}


def exact_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with the softmax in ``max(float32, input dtype)``."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.promote_types(weights.dtype, torch.float32))
    weights = nn.functional.dropout(weights.to(query.dtype), p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def register_exact_attention() -> str:
    """Register :data:`EXACT_ATTENTION` with transformers (attention function + eager-style mask); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EXACT_ATTENTION, exact_eager_attention)
    AttentionMaskInterface.register(EXACT_ATTENTION, eager_mask)
    return EXACT_ATTENTION


def model_types(config: Any) -> set[str]:
    """The model types of a config and its sub-configs (a VLM: itself, its vision encoder and its language model)."""
    types_ = {getattr(config, "model_type", None)}
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            types_ |= model_types(getattr(config, sub))
    return {t for t in types_ if t}


def supports_exact_float64(config: Any) -> bool:
    return model_types(config) <= EXACT_MODEL_TYPES


def _float64_rmsnorm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    compute = torch.promote_types(hidden_states.dtype, torch.float32)
    x = hidden_states.to(compute)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


def keep_norms_in_dtype(model: nn.Module) -> int:
    """Make Llama-style RMSNorms compute in the input dtype when it is wider than float32; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in _LLAMA_STYLE_NORMS:
            module.forward = types.MethodType(_float64_rmsnorm_forward, module)
            count += 1
    return count
