"""8-bit stochastic-rounding quantization of activations with per-group ranges (Mesa's quantizer).

A tensor is viewed as ``(outer, G, inner)``: group ``g`` owns a range ``alpha[g]`` and a shift ``beta[g]``;
``q = clamp(floor((x - beta) * s + u), 0, 255)`` with ``s = 255 / alpha`` and ``u ~ U[0, 1)`` (stochastic rounding:
unbiased inside the range), and ``x̂ = q / s + beta``. ``quantize``/``dequantize`` pick the Triton kernels on CUDA
and the plain PyTorch reference elsewhere (``impl="auto"``).
"""

from .dispatch import dequantize, quantize, resolve_impl
from .reference import dequantize_reference, quantize_reference

__all__ = ["quantize", "dequantize", "resolve_impl", "quantize_reference", "dequantize_reference"]
