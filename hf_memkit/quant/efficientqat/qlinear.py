"""E2E-QP's quantized Linear: integer codes and zero points are frozen buffers, the per-group scales are the only
parameter. ``y = x Ŵᵀ + b`` with ``Ŵ = (q − z)·s``.

The autograd function saves only ``x`` (plus the module's own buffers and parameter) and recomputes ``Ŵ`` in
backward, so training keeps what a frozen Linear would keep, not a float copy of every weight. Gradients:
``∂L/∂x = g Ŵ`` and ``∂L/∂s[o, k] = Σ_{i ∈ group k} (gᵀx)[o, i] · (q − z)[o, i]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...compress.grid import QuantizedWeight, QuantSpec, dequantize


class _DequantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, zero, scale, bias):
        w = dequantize(codes, scale, zero).to(x.dtype)
        ctx.save_for_backward(x, codes, zero, scale)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, codes, zero, scale = ctx.saved_tensors
        out, cols = codes.shape
        groups = scale.shape[1]
        gx = gs = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ dequantize(codes, scale, zero).to(grad.dtype)
        g2 = grad.reshape(-1, out)
        if ctx.needs_input_grad[3]:
            gw = g2.T.float() @ x.reshape(-1, cols).float()
            qz = codes.reshape(out, groups, -1).float() - zero.float().unsqueeze(-1)
            gs = (gw.reshape(out, groups, -1) * qz).sum(-1).to(scale.dtype)
        if ctx.bias_grad:
            gb = g2.sum(0)
        return gx, None, None, gs, gb


class QuantLinear(torch.nn.Module):
    """Drop-in for a quantized ``nn.Linear`` during E2E-QP. ``weight`` is a read-only dequantized view."""

    def __init__(self, qw: QuantizedWeight, bias: torch.nn.Parameter | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = qw.codes.shape
        self.spec: QuantSpec = qw.spec
        self.register_buffer("weight_codes", qw.codes.detach().clone())
        self.weight_scale = torch.nn.Parameter(qw.scale.detach().clone().to(dtype))
        self.register_buffer("weight_zero_point", qw.zero.detach().clone())
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        with torch.no_grad():
            return dequantize(self.weight_codes, self.weight_scale, self.weight_zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x, self.weight_codes, self.weight_zero_point, self.weight_scale, self.bias)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight_codes, self.weight_scale.detach(), self.weight_zero_point, self.spec)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}"
