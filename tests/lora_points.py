"""A generic point for LoRA tests: peft starts B at 0, where products are degenerate (half the Hessian vanishes)."""

from __future__ import annotations

import torch


def perturb_lora_b(model: torch.nn.Module, seed: int = 0, scale: float = 0.05,
                   draw_dtype: torch.dtype | None = None) -> None:
    """Set every LoRA B to seeded N(0, scale²) values, drawn in ``draw_dtype`` (default: the parameter's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=draw_dtype or p.dtype).to(p.dtype) * scale)
