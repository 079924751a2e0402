"""``impl="auto"|"torch"|"triton"``, resolved per call and logged once per (device, choice)."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from .reference import dequantize_reference, quantize_reference

logger = logging.getLogger("hf_memkit")
IMPLS = ("auto", "torch", "triton")
_logged: set[tuple[str, str]] = set()


def triton_unavailable_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the package `triton` is not installed (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the tensors are on {device.type}; the Triton kernels need CUDA (or TRITON_INTERPRET=1 in tests)"
    return None


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not an implementation; use one of {', '.join(IMPLS)}")
    if impl == "auto":
        chosen = "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"
    elif impl == "triton":
        reason = triton_unavailable_reason(device)
        if reason:
            raise ValueError(f"impl='triton' cannot run: {reason}. Use impl='auto' or impl='torch'")
        chosen = "triton"
    else:
        chosen = "torch"
    if (device.type, chosen) not in _logged:
        _logged.add((device.type, chosen))
        logger.info("hf_memkit: 8-bit activation quantizer runs impl=%s on %s (requested %s)", chosen, device.type,
                    impl)
    return chosen


def quantize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """uint8 tensor of ``x``'s ``(outer, G, inner)`` shape; see :func:`.reference.quantize_reference`."""
    if resolve_impl(impl, x.device) == "triton":
        from .triton import quantize_triton

        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # CPU generator: reproducible, no device sync
        return quantize_triton(x, scale, shift, seed)
    return quantize_reference(x, scale, shift)


def dequantize(q: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype,
               impl: str = "auto") -> torch.Tensor:
    if resolve_impl(impl, q.device) == "triton":
        from .triton import dequantize_triton

        return dequantize_triton(q, scale, shift, dtype)
    return dequantize_reference(q, scale, shift, dtype)
