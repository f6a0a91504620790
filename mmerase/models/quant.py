"""4-bit (NF4) base layers that give exact curvature products without keeping dequantized weights alive.

bitsandbytes' ``Linear4bit`` is exact under double backward (its backward is ``grad @ dequantize(W)``, a plain
differentiable matmul) but two details matter for influence products:

- **Memory.** With ``create_graph=True`` that backward matmul is recorded, so autograd saves the *dequantized*
  weight of every layer for the second backward: a full-precision copy of the base (≈13 GB in bf16 for a 7B model)
  alive during each Hessian-vector product. :func:`prepare_4bit` replaces the forward by a pair of autograd
  functions, ``x ↦ x Wᵀ`` and ``g ↦ g W``, each the other's backward, that dequantize W again whenever they run and
  save only a reference to the packed 4-bit weight. Products are the same function (the dequantized weight is
  identical each time).
- **The CPU eval path.** In eval mode, on a CPU with AVX512-BF16, ``Linear4bit`` repacks its weight in place and
  calls a kernel without autograd, so the gradient through the layer silently vanishes. The replacement forward
  never takes that path, and the layers are flagged ``mmerase_keep_training`` so that the influence engine, which
  puts the model in eval mode during products, leaves them in training mode (they have no dropout; training mode
  only selects bitsandbytes' autograd path) even where the native forward is kept (``recompute=False``).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


def _dequantized(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight, dequantized to ``dtype`` (shape [out_features, in_features]); a fresh tensor."""
    import bitsandbytes.functional as bnbF

    weight = layer.weight
    return bnbF.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


class _Linear4bitNoBias(torch.autograd.Function):
    """y = x Wᵀ, W dequantized on demand; backward is :class:`_Linear4bitTransposed` (differentiable again)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return torch.nn.functional.linear(x, _dequantized(layer, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Linear4bitTransposed.apply(grad, ctx.layer), None


class _Linear4bitTransposed(torch.autograd.Function):
    """g ↦ g W (the input gradient of x Wᵀ); its backward is :class:`_Linear4bitNoBias`."""

    @staticmethod
    def forward(ctx: Any, grad: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return torch.matmul(grad, _dequantized(layer, grad.dtype))

    @staticmethod
    def backward(ctx: Any, gg: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Linear4bitNoBias.apply(gg, ctx.layer), None


def _recompute_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` through :class:`_Linear4bitNoBias` (same result, nothing dequantized kept)."""
    try:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(self)
    except ImportError:  # older bitsandbytes: the quant state always lives on the weight
        pass
    if getattr(self.weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError(
            "this Linear4bit's weight was repacked by bitsandbytes' CPU inference path (eval mode, no grad) before "
            "mmerase.models.quant.prepare_4bit was applied; call prepare_4bit right after loading the model")
    inp_dtype = x.dtype
    compute = self.compute_dtype or x.dtype
    out = _Linear4bitNoBias.apply(x.to(compute), self)
    if self.bias is not None:
        out = out + self.bias.to(compute)
    return out.to(inp_dtype)


def prepare_4bit(model: nn.Module, recompute: bool = True) -> int:
    """Make every bitsandbytes ``Linear4bit`` in ``model`` product-ready (see the module docstring); returns how many.

    ``recompute=True`` installs the re-dequantizing forward; ``False`` keeps bitsandbytes' own forward (its double
    backward then holds each layer's dequantized weight). Either way the layers keep training mode during products.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.mmerase_keep_training = True
            if recompute:
                module.forward = types.MethodType(_recompute_forward, module)
            elif "forward" in module.__dict__:
                del module.forward
            count += 1
    return count


def dequantized_copy(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding ``layer``'s dequantized weight (in its compute dtype) and bias: the reference a
    4-bit layer's products are exact against."""
    dtype = layer.compute_dtype or torch.float32
    weight = _dequantized(layer, dtype)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.to(dtype))
    lin.requires_grad_(False)
    return lin


__all__ = ["dequantized_copy", "prepare_4bit"]
