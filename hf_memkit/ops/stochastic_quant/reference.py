"""Plain PyTorch quantize/dequantize (any device). Tensors come laid out as ``(outer, G, inner)``: group ``g`` is
the middle index; ``scale``/``shift`` hold G fp32 entries."""

from __future__ import annotations

import torch

LEVELS = 255  # 8 bits: q in 0..255


def scale_of(alpha: torch.Tensor) -> torch.Tensor:
    """s = 255 / alpha, with a floor on alpha so that a constant group (alpha = 0) quantizes to its shift."""
    return LEVELS / alpha.float().clamp_min(1e-12)


def quantize_reference(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``q = clamp(floor((x - shift)·scale + u), 0, 255)``; ``noise`` (U[0,1), x's shape) defaults to a fresh
    ``torch.rand``. Clamping at both ends: values outside the running range saturate instead of wrapping."""
    if x.dim() != 3 or x.shape[1] != scale.numel():
        raise ValueError(f"expected an (outer, {scale.numel()}, inner) tensor, got shape {tuple(x.shape)}")
    u = torch.rand(x.shape, device=x.device, dtype=torch.float32) if noise is None else noise
    v = torch.floor((x.float() - shift.view(1, -1, 1)) * scale.view(1, -1, 1) + u)
    return v.clamp_(0, LEVELS).to(torch.uint8)


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """``x̂ = q / scale + shift`` in ``dtype`` (computed in fp32)."""
    x = q.float() / scale.view(1, -1, 1) + shift.view(1, -1, 1)
    return x.to(dtype)
