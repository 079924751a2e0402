"""fp32 compute over 16-bit weights: the autograd Functions the patched Linear and Embedding modules call.

* :class:`Linear16` — ``y = x · W.float()ᵀ + b``. Saves ``x`` (only when W trains) and the 16-bit ``W`` itself,
  never an fp32 copy: backward upcasts W again for ``dx``, forms ``dW`` in fp32 and returns it in W's dtype. Weights
  larger than :data:`UPCAST_BLOCK_BYTES` in fp32 (an untied 49152x576 lm_head is 113 MiB) are upcast in blocks of
  output rows, so the transient fp32 weight never exceeds one block, in forward or backward.
* :class:`Embedding16` — fp32 rows of a 16-bit table. Backward sums the gradient per *distinct* token in fp32
  (not per table row), then scatters the rounded sums into a 16-bit gradient: no (V, D) fp32 buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: fp32 bytes of the weight block one matmul upcasts at a time
UPCAST_BLOCK_BYTES = 16 * 2**20


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (gradient checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_blocks(weight: torch.Tensor, cdt: torch.dtype):
    """(o0, o1) output-row ranges whose fp32 copy stays within UPCAST_BLOCK_BYTES."""
    out_f, in_f = weight.shape
    rows = max(1, UPCAST_BLOCK_BYTES // max(in_f * torch.finfo(cdt).bits // 8, 1))
    for o0 in range(0, out_f, rows):
        yield o0, min(o0 + rows, out_f)


def _blocked(weight: torch.Tensor, cdt: torch.dtype) -> bool:
    return weight.numel() * (torch.finfo(cdt).bits // 8) > UPCAST_BLOCK_BYTES and not torch.is_autocast_enabled()


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight.to(cdt), bias)`` computed without more than one fp32 weight block at a time."""
    cdt = compute_dtype(x)
    x = x.to(cdt)
    b = bias.to(cdt) if bias is not None and bias.dtype != cdt else bias
    if not _blocked(weight, cdt):
        return F.linear(x, weight.to(cdt), b)
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], weight.shape[0], dtype=cdt, device=x.device)
    for o0, o1 in _row_blocks(weight, cdt):
        torch.mm(x2, weight[o0:o1].to(cdt).t(), out=out[:, o0:o1])
    if b is not None:
        out.add_(b)
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        out = linear_forward(x, weight, bias)
        need_w = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_w else None, weight)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        cdt = compute_dtype(g)
        g = g.to(cdt)
        g2 = g.reshape(-1, g.shape[-1])
        dx = dw = db = None
        blocked = _blocked(weight, cdt)
        if ctx.needs_input_grad[0]:
            if not blocked:
                dx = g2 @ weight.to(cdt)
            else:
                dx = torch.zeros(g2.shape[0], weight.shape[1], dtype=cdt, device=g.device)
                for o0, o1 in _row_blocks(weight, cdt):
                    dx.addmm_(g2[:, o0:o1], weight[o0:o1].to(cdt))
            dx = dx.view(*g.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1]).to(cdt)
            if not blocked:
                dw = (g2.t() @ x2).to(weight.dtype)
            else:  # each fp32 block is rounded into the 16-bit gradient as soon as it is complete
                dw = torch.empty_like(weight)
                for o0, o1 in _row_blocks(weight, cdt):
                    dw[o0:o1] = g2[:, o0:o1].t() @ x2
        if ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def linear16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What a patched ``nn.Linear`` computes: through :class:`Linear16` while gradients are recorded, the plain
    blocked forward otherwise (evaluation, ``no_grad``)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return Linear16.apply(x, weight, bias)
    return linear_forward(x, weight, bias)


class Embedding16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, cdt):
        ctx.save_for_backward(ids)
        ctx.meta = (weight.shape, weight.dtype, padding_idx, cdt)
        return F.embedding(ids, weight, padding_idx).to(cdt)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        shape, dtype, padding_idx, cdt = ctx.meta
        flat = ids.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        sums = torch.zeros(uniq.shape[0], shape[1], dtype=cdt, device=g.device)
        sums.index_add_(0, inverse, g.reshape(-1, shape[1]).to(cdt))
        if padding_idx is not None:
            sums[uniq == padding_idx] = 0
        dw = torch.zeros(shape, dtype=dtype, device=g.device)
        dw.index_copy_(0, uniq, sums.to(dtype))
        return None, dw, None, None


def embedding16(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None,
                cdt: torch.dtype = torch.float32) -> torch.Tensor:
    """What a patched ``nn.Embedding`` computes: fp32 rows of the 16-bit table."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return Embedding16.apply(ids, weight, padding_idx, cdt)
    return F.embedding(ids, weight, padding_idx).to(cdt)
