"""EfficientQAT's learnable uniform quantizer (``UniformAffineQuantizer`` in the reference), as a training-time
stand-in for an ``nn.Linear``.

Forward: ``s' = clamp_ste(s)``, ``z' = clamp_ste(round_ste(z), 0, 2^b − 1)``, ``q = clamp(round_ste(W/s') + z',
0, 2^b − 1)``, ``ŵ = (q − z')·s'``. The straight-through ops return the rounded/clamped value and pass the
gradient unchanged; the outer clamp on ``q`` is an ordinary clamp, so weights outside the grid's range get no
gradient through it. Symmetric grids keep ``z = 2^(b−1)`` fixed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...compress.grid import QuantizedWeight, QuantSpec, fit_group_params, quantize_with_params, store_params

SCALE_MIN, SCALE_MAX = 1e-5, 1e4  # the reference clamps to [1e-4, 1e4] in fp16; fp32 here allows finer scales


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (x.clamp(lo, hi) - x).detach() + x


class FakeQuantLinear(torch.nn.Module):
    """Shares the wrapped Linear's ``weight`` and ``bias`` Parameters (training updates them in place) and adds
    ``scale`` and ``zero`` (fp32) initialised from the min/max grid."""

    def __init__(self, linear: torch.nn.Linear, spec: QuantSpec):
        super().__init__()
        self.spec = spec = spec.for_width(linear.in_features)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        scale, zero = fit_group_params(linear.weight.detach().float(), spec, dtype=torch.float32)
        self.scale = torch.nn.Parameter(scale.clone())
        self.zero = torch.nn.Parameter(zero.float(), requires_grad=not spec.symmetric)
        self.quantize = True

    def fake_weight(self) -> torch.Tensor:
        maxq = self.spec.maxq
        s = clamp_ste(self.scale, SCALE_MIN, SCALE_MAX).unsqueeze(-1)
        z = clamp_ste(round_ste(self.zero), 0, maxq).unsqueeze(-1)
        w = self.weight.reshape(self.out_features, self.scale.shape[1], -1)
        q = torch.clamp(round_ste(w / s) + z, 0, maxq)
        return ((q - z) * s).reshape(self.out_features, self.in_features).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight() if self.quantize else self.weight
        return F.linear(x, w, self.bias)

    def final_weight(self, dtype: torch.dtype) -> QuantizedWeight:
        """The final codes: the trained scale (stored in ``dtype``) and rounded zero fix the grid, the trained
        weight is rounded onto it."""
        with torch.no_grad():
            scale, zero = store_params(self.scale.clamp(SCALE_MIN, SCALE_MAX),
                                       self.zero.round().clamp(0, self.spec.maxq), dtype)
            return quantize_with_params(self.weight.float(), scale, zero, self.spec)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.spec.describe()}"


def quant_params(modules: list[Any]) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in (m.scale, m.zero) if p.requires_grad]
