"""The uniform weight grid shared by every quantizer: fitting scales and zero points, codes, dequantization.

Layout (PyTorch ``W ∈ R^{out×in}``): a *group* is ``group_size`` consecutive input columns of one output row;
``group_size=None`` means one group per row (per-channel). For each group, ``scale`` and ``zero`` define the grid
``ŵ = scale · (q − zero)`` with integer codes ``q ∈ [0, 2^bits − 1]``:

* asymmetric: ``scale = (max − min) / (2^bits − 1)``, ``zero = round(−min / scale)`` (min/max widened to include 0);
* symmetric:  ``scale = 2·max|w| / (2^bits − 1)``, ``zero = 2^(bits−1)`` (the signed grid of compressed-tensors).

Codes are stored unsigned (``uint8``); compressed-tensors stores them signed (``q − 2^(bits−1)``), which the
exporter converts. Scales are kept in the weight's dtype and codes are computed *with the stored scale*, so the
dequantized weight here and the one compressed-tensors rebuilds from a checkpoint are the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """What one quantized weight looks like: bit width, group size (None = per output channel), symmetry."""

    bits: int
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{self.bits}-bit weights are not supported; use one of {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be at least 1 (or null for per-channel), got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_width(self, in_features: int) -> int:
        return self.group_size if self.group_size is not None and self.group_size < in_features else in_features

    def for_width(self, in_features: int) -> "QuantSpec":
        """The spec one layer actually gets: a layer narrower than the group size has one group per row."""
        if self.group_size is not None and self.group_size > in_features:
            return QuantSpec(self.bits, None, self.symmetric)
        return self

    def num_groups(self, in_features: int) -> int:
        return in_features // self.group_width(in_features)

    def check_width(self, in_features: int, module: str, key: str) -> None:
        """Raise :class:`IncompatibleModelError` when the groups do not tile the input width exactly (a layer
        narrower than one group is quantized per channel instead)."""
        if self.group_size is not None and in_features > self.group_size and in_features % self.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            hint = f"e.g. group_size: {divisors[-1]}" if divisors else "or group_size: null (per channel)"
            raise IncompatibleModelError(
                f"{key}: group_size {self.group_size} does not divide the input width {in_features} of {module}; "
                f"choose a group size that divides every quantized layer's width ({hint}), or add {module!r} to "
                "skip_modules"
            )

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"w{self.bits} {g} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


@dataclass
class QuantizedWeight:
    """Codes (uint8 ``[out, in]``), scale (``[out, groups]``, weight dtype) and zero (uint8 ``[out, groups]``)."""

    codes: "torch.Tensor"
    scale: "torch.Tensor"
    zero: "torch.Tensor"
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> "torch.Tensor":
        return dequantize(self.codes, self.scale, self.zero)


# ---------------------------------------------------------------------------------------------------------
# fitting


def _minmax_params(xmin: "torch.Tensor", xmax: "torch.Tensor", spec: QuantSpec):
    import torch

    if spec.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
        scale = 2 * xmax / spec.maxq
        zero = torch.full_like(scale, float((spec.maxq + 1) // 2))
    else:
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / spec.maxq
        zero = torch.round(-xmin / scale)
    return scale, zero


def fit_params(w: "torch.Tensor", spec: QuantSpec, *, mse: bool = False, grid: int = 100, maxshrink: float = 0.8,
               norm: float = 2.4) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-row (scale, zero) in fp32 for ``w [rows, k]``, from the row's range (min/max widened to include 0).

    ``mse``: also try ranges shrunk by ``p ∈ (1 − maxshrink, 1]`` (``grid`` steps) and keep, per row, the one
    with the smallest ``Σ|ŵ − w|^norm`` (the GPTQ reference's search; it clips outliers to refine the rest).
    """
    import torch

    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.amin(dim=1), zeros)
    xmax = torch.maximum(w.amax(dim=1), zeros)
    scale, zero = _minmax_params(xmin, xmax, spec)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        s1, z1 = _minmax_params(p * xmin, p * xmax, spec)
        q = fake_quantize(w, s1[:, None], z1[:, None], spec.maxq)
        err = (q - w).abs_().pow_(norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def store_params(scale: "torch.Tensor", zero: "torch.Tensor", dtype: "torch.dtype"):
    """(scale in the storage dtype, zero as uint8). Codes must then be computed with the *stored* scale."""
    import torch

    return scale.to(dtype), zero.round().clamp_(0, 255).to(torch.uint8)


def fit_group_params(w: "torch.Tensor", spec: QuantSpec, *, mse: bool = False, dtype: "torch.dtype | None" = None):
    """Stored (scale ``[out, groups]``, zero uint8 ``[out, groups]``) for every group of ``w [out, in]``."""
    out, cols = w.shape
    width = spec.group_width(cols)
    groups = w.float().reshape(out * (cols // width), width)
    scale, zero = fit_params(groups, spec, mse=mse)
    return store_params(scale.reshape(out, -1), zero.reshape(out, -1), dtype or w.dtype)


# ---------------------------------------------------------------------------------------------------------
# codes


def quantize_to_codes(w: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor", maxq: int) -> "torch.Tensor":
    """``clamp(round(w / scale) + zero, 0, maxq)`` in fp32 (elementwise; scale/zero broadcast against w)."""
    import torch

    return torch.clamp(torch.round(w.float() / scale.float()) + zero.float(), 0, maxq)


def fake_quantize(w: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor", maxq: int) -> "torch.Tensor":
    return scale * (quantize_to_codes(w, scale, zero, maxq) - zero)


def expand_groups(t: "torch.Tensor", in_features: int) -> "torch.Tensor":
    """``[out, groups]`` -> ``[out, in]``, each group's value repeated over its columns."""
    return t.repeat_interleave(in_features // t.shape[1], dim=1)


def dequantize(codes: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor") -> "torch.Tensor":
    """``(codes − zero) · scale`` in the scale's dtype, computed exactly as compressed-tensors does on load."""
    out, cols = codes.shape
    groups = scale.shape[1]
    q = codes.reshape(out, groups, cols // groups).to(scale.dtype)
    w = (q - zero.to(scale.dtype).unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.reshape(out, cols)


def rtn_quantize(w: "torch.Tensor", spec: QuantSpec, *, mse: bool = False,
                 dtype: "torch.dtype | None" = None) -> QuantizedWeight:
    """Round-to-nearest: fit each group's grid on ``w`` and round every value to it."""
    import torch

    out, cols = w.shape
    spec = spec.for_width(cols)
    scale, zero = fit_group_params(w, spec, mse=mse, dtype=dtype)
    width = spec.group_width(cols)
    codes = quantize_to_codes(w.reshape(out, cols // width, width), scale.float().unsqueeze(-1),
                              zero.float().unsqueeze(-1), spec.maxq)
    return QuantizedWeight(codes.reshape(out, cols).to(torch.uint8), scale, zero, spec)


def quantize_with_params(w: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor",
                         spec: QuantSpec) -> QuantizedWeight:
    """Codes of ``w`` on a given grid (scale ``[out, groups]`` in its storage dtype, zero uint8)."""
    import torch

    out, cols = w.shape
    width = cols // scale.shape[1]
    codes = quantize_to_codes(w.reshape(out, cols // width, width), scale.float().unsqueeze(-1),
                              zero.float().unsqueeze(-1), spec.maxq)
    return QuantizedWeight(codes.reshape(out, cols).to(torch.uint8), scale, zero, spec)


def storage_bits(spec: QuantSpec, out_features: int, in_features: int, scale_bytes: int) -> int:
    """Bits a packed layer takes: codes + one scale per group (+ a packed zero point when asymmetric)."""
    groups = out_features * spec.num_groups(in_features)
    bits = out_features * in_features * spec.bits + groups * scale_bytes * 8
    if not spec.symmetric:
        bits += groups * spec.bits
    return bits
