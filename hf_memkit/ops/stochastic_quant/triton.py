"""Triton quantize/dequantize kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests). Imported lazily by
``dispatch.py``, never by ``import hf_memkit``.

One program per BLOCK elements of the flattened ``(outer, G, inner)`` tensor; the group of element ``i`` is
``(i // inner) % G``. The random offsets come from ``tl.rand(seed, i)`` (Philox), seeded from torch's CPU
generator so that a run is reproducible from the Trainer's saved RNG state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _quantize_kernel(X, Q, SCALE, SHIFT, seed, n, inner, G, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = (offs // inner) % G
    s = tl.load(SCALE + g, mask=mask, other=1.0)
    b = tl.load(SHIFT + g, mask=mask, other=0.0)
    u = tl.rand(seed, offs.to(tl.int32))
    v = tl.floor((x - b) * s + u)
    v = tl.minimum(tl.maximum(v, 0.0), 255.0)
    tl.store(Q + offs, v.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_kernel(Q, X, SCALE, SHIFT, n, inner, G, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(Q + offs, mask=mask, other=0).to(tl.float32)
    g = (offs // inner) % G
    s = tl.load(SCALE + g, mask=mask, other=1.0)
    b = tl.load(SHIFT + g, mask=mask, other=0.0)
    tl.store(X + offs, (q / s + b).to(X.dtype.element_ty), mask=mask)


def quantize_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, seed: int) -> torch.Tensor:
    outer, groups, inner = x.shape
    x = x.contiguous()
    q = torch.empty(x.shape, device=x.device, dtype=torch.uint8)
    n = x.numel()
    if n:
        _quantize_kernel[(triton.cdiv(n, BLOCK),)](x, q, scale.float().contiguous(), shift.float().contiguous(),
                                                  seed, n, inner, groups, BLOCK=BLOCK)
    return q


def dequantize_triton(q: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    outer, groups, inner = q.shape
    q = q.contiguous()
    x = torch.empty(q.shape, device=q.device, dtype=dtype)
    n = q.numel()
    if n:
        _dequantize_kernel[(triton.cdiv(n, BLOCK),)](q, x, scale.float().contiguous(), shift.float().contiguous(),
                                                    n, inner, groups, BLOCK=BLOCK)
    return x
