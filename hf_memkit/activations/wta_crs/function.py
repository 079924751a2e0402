"""The autograd Function: forward and input gradient exact, weight gradient from the sampled rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampler import choose_rows, row_probabilities, sample_size


class WtaCrsLinear(torch.autograd.Function):
    """y = x Wᵀ + b exactly; saves only the k chosen rows of x (pre-scaled by their weights) and their indices."""

    @staticmethod
    def forward(ctx, x, weight, bias, ratio: float, min_k: int, winners: bool):
        # a weight view (AST's W ⊙ M, computed per call) is saved as a tensor of its own, so that it is accounted;
        # a parameter is held by the model anyway
        view = weight.grad_fn is not None
        ctx.weight, ctx.has_bias, ctx.x_shape = None if view else weight, bias is not None, x.shape
        saved: tuple = ()
        if weight.requires_grad:
            x2 = x.detach().reshape(-1, x.shape[-1])
            k = sample_size(x2.shape[0], ratio, min_k)
            idx, w = choose_rows(row_probabilities(x2), k, winners)
            rows = (x2.index_select(0, idx).float() * w[:, None]).to(x.dtype)
            saved = (rows, idx)
        ctx.save_for_backward(*saved, *((weight,) if view else ()))
        ctx.sampled = bool(saved)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        weight = ctx.weight if ctx.weight is not None else ctx.saved_tensors[-1]
        gx = gw = gb = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = g.matmul(weight.to(g.dtype))
        if ctx.needs_input_grad[1]:
            rows, idx = ctx.saved_tensors[:2]
            gw = g2.index_select(0, idx).t().matmul(rows.to(g.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(weight.dtype)
        return gx, gw, gb, None, None, None
