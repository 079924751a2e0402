"""``LorcLinear``: a frozen quantized Linear plus a trainable low-rank branch, ``y = Ŵx + s·B(A(x))``.

The base weight lives only as integer codes (``lorc_codes`` uint8 ``[out, in]``, ``lorc_scale``,
``lorc_zero``); the Linear's own ``weight`` storage is released, so the frozen base costs one byte per value
(plus scales) instead of two or four. :class:`DequantLinear` rebuilds ``Ŵ`` in the forward and again in the
backward, so no dense copy of it is kept between them. Naming follows PEFT's LoRA: ``lorc_A`` is ``[r, in]``
(LoRC's B), ``lorc_B`` is ``[out, r]`` (LoRC's A).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...compress.grid import QuantizedWeight, QuantSpec, dequantize


class DequantLinear(torch.autograd.Function):
    """``x @ Ŵᵀ + b`` with ``Ŵ`` dequantized from the codes in forward and backward (the codes are frozen)."""

    @staticmethod
    def forward(ctx, x, codes, scale, zero, bias):
        w = dequantize(codes, scale, zero).to(x.dtype)
        ctx.save_for_backward(codes, scale, zero)
        return nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        codes, scale, zero = ctx.saved_tensors
        w = dequantize(codes, scale, zero).to(grad.dtype)
        return grad @ w, None, None, None, None


class LorcLinear(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("lorc_A", "lorc_B")
    other_param_names = ("scaling", "lorc_dropout")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: Any, qw: QuantizedWeight,
                 factors: tuple[torch.Tensor, torch.Tensor] | None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.spec = qw.spec
        dev = base_layer.weight.device
        self.register_buffer("lorc_codes", qw.codes.to(dev))
        self.register_buffer("lorc_scale", qw.scale.to(dev))
        self.register_buffer("lorc_zero", qw.zero.to(dev))
        self.weight_dtype = base_layer.weight.dtype
        # the dense weight is now redundant: release its storage (unload() rebuilds it from the codes)
        base_layer.weight.data = torch.empty(0, dtype=base_layer.weight.dtype, device=dev)
        self.lorc_A = nn.ModuleDict()
        self.lorc_B = nn.ModuleDict()
        self.lorc_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config, factors)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config: Any, factors: tuple[torch.Tensor, torch.Tensor] | None = None):
        dev = self.lorc_codes.device
        r = config.r if factors is None else int(factors[0].shape[1])
        A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=self.weight_dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=self.weight_dtype)
        s = config.lora_alpha / config.r
        with torch.no_grad():
            if factors is None:  # no compensation to start from: plain LoRA init (B = 0)
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
                nn.init.zeros_(B.weight)
            else:
                U, V = factors  # LoRC A [out, r], B [r, in]
                A.weight.copy_(V.to(A.weight.dtype))
                B.weight.copy_((U.double() / s).to(B.weight.dtype))
        self.lorc_A[adapter_name], self.lorc_B[adapter_name] = A, B
        self.lorc_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling[adapter_name] = s
        self.set_adapter(self.active_adapters)

    def quantized(self) -> QuantizedWeight:  # not `quantized_weight`: compress.linear would take this for a
        # post-training quantized module
        return QuantizedWeight(self.lorc_codes, self.lorc_scale, self.lorc_zero, self.spec)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.lorc_codes, self.lorc_scale, self.lorc_zero).to(self.weight_dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = DequantLinear.apply(x, self.lorc_codes, self.lorc_scale, self.lorc_zero, self.base_layer.bias)
        if self.disable_adapters:
            return y
        for name in self.active_adapters:
            if name not in self.lorc_A:
                continue
            A, B = self.lorc_A[name], self.lorc_B[name]
            h = self.lorc_dropout[name](x).to(A.weight.dtype)
            # same two matmuls, same order, as compress.linear's LoRC hook and a PEFT LoRA layer
            branch = B(A(h))
            y = y + (branch if self.scaling[name] == 1 else branch * self.scaling[name]).to(y.dtype)
        return y

    def compensation(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRC's ``(A [out, r], B [r, in])`` with the scaling folded into A."""
        s = self.scaling[name]
        A = self.lorc_B[name].weight.detach()
        return (A if s == 1 else A * s), self.lorc_A[name].weight.detach()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from ...errors import IncompatibleModelError

        raise IncompatibleModelError(
            "LoRC keeps its branch beside the integer weights (folding it in would leave the grid); use "
            "merge_and_unload() for a dense Ŵ + A·B model, or export it as quantized base + LoRA adapter "
            "(hf_memkit.adapters.lorc.export.export_lorc)"
        )

    def unmerge(self) -> None:
        return None

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool = False,
                                           adapter_names: list[str] | None = None) -> nn.Module:
        """The plain Linear back, holding ``Ŵ`` (+ ``A·B`` when merging): the full-precision weights were
        dropped when the layer was quantized."""
        w = self.dequantized()
        if merge:
            for name in adapter_names or self.active_adapters:
                A, B = self.compensation(name)
                w = (w.double() + A.double() @ B.double()).to(w.dtype)
        self.base_layer.weight.data = w.contiguous()
        return self.base_layer
