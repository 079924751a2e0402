"""Per-output-channel symmetric int8 weights and Quantization-Aware Scaling (QAS).

A weight ``W`` (out × in) is stored as ``W̄ = round(W / s)`` clamped to [-127, 127] with one scale
``s = max|W_row| / 127`` per output row, and used as ``s ⊙ W̄``. Training ``W̄`` directly sees the gradient
``G_W̄ = s ⊙ G_W`` (chain rule through ``W = s ⊙ W̄``) while ``W̄ ≈ W / s``, so per row
``‖G_W̄‖/‖W̄‖ ≈ s² · ‖G_W‖/‖W‖``: with s ~ 1e-3 the update is a million times too small. QAS multiplies the
gradient by ``s⁻²``, which restores the float ratio row by row: ``G̃ = G_W̄ / s² = G_W / s``.

QAS is what makes plain SGD (the paper's optimizer, no momentum) work on int8 weights. Adam-type optimizers divide
by the gradient's running RMS, which cancels any per-row scale: there the step is about ``lr`` int8 units
whatever QAS does, so ``lr`` must be chosen in those units (1 = one quantization step).

The paper also rescales the int32 bias gradient by ``(s_W·s_x)⁻²``; here activations stay in floating point (no
``s_x``), biases stay float and need no scaling.
"""

from __future__ import annotations

from typing import Any

QMAX = 127


def quantize_per_channel(weight: Any) -> tuple[Any, Any]:
    """(int8 weight, fp32 scale per output row) of a 2-D weight; all-zero rows get scale 1."""
    import torch

    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale[:, None]), -QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: Any, scale: Any, dtype: Any = None) -> Any:
    w = q.float() * scale[:, None]
    return w.to(dtype) if dtype is not None else w


def round_to_grid(w_bar: Any) -> Any:
    """The integer values a trainable int8-unit tensor takes in the forward (straight-through in backward)."""
    import torch

    return torch.clamp(torch.round(w_bar), -QMAX, QMAX)


def qas_scale_(grad: Any, scale: Any) -> Any:
    """In place: ``G̃ = G_W̄ · s⁻²`` with ``s`` per output row."""
    return grad.div_(scale.to(grad.dtype)[:, None] ** 2)
