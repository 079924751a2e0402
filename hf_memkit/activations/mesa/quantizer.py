"""Running per-group ranges and the 8-bit packing of one saved tensor.

A :class:`RangeTracker` belongs to one site (one module's input, one attention operand). Its range α and shift β
per group follow Mesa's running estimate: on the first call α = max − min and β = min of the current tensor,
afterwards α ← α − (1−λ)(α − (max − min)) and β ← β − (1−λ)(β − min) (λ = ``ema_decay``). Values outside the
running range are clamped at both ends. With ``cover`` (the default), the range used for a tensor is the running
range widened to include that tensor's own min/max, so nothing is clipped (pure Mesa clips values while the
running range lags behind a growing residual stream, which on the tiny Llama turned RMSNorm input gradients
around within a dozen steps). Grouping: a ``[..., C]`` tensor is split into G contiguous channel groups
(G = gcd(C, groups)); a ``[B, H, L, D]`` attention tensor gets one group per head.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ...ops.stochastic_quant import dequantize, quantize
from ...ops.stochastic_quant.reference import scale_of


@dataclass
class Packed:
    """The 8-bit form of one tensor: ``q`` (uint8, in the tensor's own shape) and ``params`` ((2, G) fp32: scale and
    shift at quantization time). Both go through ``ctx.save_for_backward`` (so saved-tensor hooks see them);
    ``view3`` is the ``(outer, G, inner)`` layout the quantizer works in."""

    q: torch.Tensor
    params: torch.Tensor
    view3: tuple[int, int, int]
    dtype: torch.dtype

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q, self.params

    @staticmethod
    def restore(q: torch.Tensor, params: torch.Tensor, view3: tuple[int, int, int], dtype: torch.dtype,
                impl: str) -> torch.Tensor:
        return dequantize(q.reshape(view3), params[0], params[1], dtype, impl).reshape(q.shape)


class RangeTracker:
    """Running range of one site; ``layout`` is ``"channels"`` or ``"heads"``."""

    def __init__(self, name: str, layout: str, groups: int, ema_decay: float, impl: str = "auto",
                 cover: bool = True):
        self.name, self.layout, self.groups, self.ema_decay, self.impl = name, layout, groups, ema_decay, impl
        self.cover = cover
        self.alpha: torch.Tensor | None = None
        self.beta: torch.Tensor | None = None

    def view3(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "heads":
            if x.dim() != 4:
                raise ValueError(f"{self.name}: per-head quantization expects [B, H, L, D], got {tuple(x.shape)}")
            b, h = x.shape[:2]
            return x.reshape(b, h, -1)
        c = x.shape[-1]
        g = math.gcd(c, self.groups) or 1
        return x.reshape(-1, g, c // g)

    @torch.no_grad()
    def pack(self, x: torch.Tensor) -> Packed:
        x3 = self.view3(x.detach())
        flat = x3.transpose(0, 1).reshape(x3.shape[1], -1)
        lo, hi = flat.amin(1).float(), flat.amax(1).float()
        if self.alpha is None or self.alpha.shape != lo.shape or self.alpha.device != lo.device:
            self.alpha, self.beta = hi - lo, lo.clone()
        else:
            keep = 1.0 - self.ema_decay
            self.alpha.sub_(keep * (self.alpha - (hi - lo)))
            self.beta.sub_(keep * (self.beta - lo))
        alpha, beta = self.alpha, self.beta
        if self.cover:  # widen the running range to the current tensor's: nothing is clipped
            beta = torch.minimum(beta, lo)
            alpha = torch.maximum(self.beta + self.alpha, hi) - beta
        params = torch.stack([scale_of(alpha), beta.clone()])
        q = quantize(x3.contiguous(), params[0], params[1], self.impl)
        return Packed(q.reshape(x.shape), params, tuple(x3.shape), x.dtype)

    # state ----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        if self.alpha is None:
            return {}
        return {"alpha": self.alpha.detach().cpu().clone(), "beta": self.beta.detach().cpu().clone()}

    def load(self, state: dict[str, torch.Tensor], device: Any = None) -> None:
        if "alpha" in state:
            self.alpha = state["alpha"].float().to(device or "cpu").clone()
            self.beta = state["beta"].float().to(device or "cpu").clone()


class PackCache:
    """Sibling modules that read the same tensor (q/k/v projections, gate/up) share its 8-bit copy: the first one
    quantizes it (with its own running range), the others reuse the packed tensors, so one copy is saved. Keyed
    by the tensor's identity and version; holds the tensor only weakly and forgets everything at each new root
    forward (see the technique's pre-hook)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[Any, int, str, Packed]] = []

    def clear(self) -> None:
        self.entries.clear()

    def get(self, x: torch.Tensor, key: str) -> Packed | None:
        for ref, version, k, packed in self.entries:
            if ref() is x and version == x._version and k == key:
                return packed
        return None

    def put(self, x: torch.Tensor, key: str, packed: Packed) -> None:
        self.entries.append((weakref.ref(x), x._version, key, packed))
        del self.entries[:-self.size]


def pack_with(tracker: RangeTracker, x: torch.Tensor, cache: PackCache | None) -> Packed:
    if cache is None:
        return tracker.pack(x)
    key = f"{tracker.layout}:{tracker.groups}:{tuple(x.shape)}"
    packed = cache.get(x, key)
    if packed is None:
        packed = tracker.pack(x)
        cache.put(x, key, packed)
    return packed
