"""Autograd Functions of the covered ops. Each forward runs in full precision and returns exactly what the plain
op returns; what backward needs is saved as :class:`~.quantizer.Packed` 8-bit tensors (plus the exact small
per-row statistics of the norms: 1/rms and the mean, fp32) and dequantized in backward. Weights are parameters,
held by reference (they cost no activation memory).

The elementwise Functions (activation, gated activation) re-run the module's own function on the dequantized
input under autograd in backward, so any activation module works without a hand-written derivative.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .quantizer import Packed, PackCache, RangeTracker, pack_with


def _save(ctx: Any, packs: list[Packed], extras: tuple = ()) -> None:
    ctx.meta = [(p.view3, p.dtype) for p in packs]
    ctx.save_for_backward(*(t for p in packs for t in p.tensors()), *extras)


def _restore(ctx: Any, impl: str) -> tuple[list[torch.Tensor], tuple]:
    saved = ctx.saved_tensors
    n = len(ctx.meta)
    xs = [Packed.restore(saved[2 * i], saved[2 * i + 1], view3, dtype, impl)
          for i, (view3, dtype) in enumerate(ctx.meta)]
    return xs, saved[2 * n:]


class MesaLinear(torch.autograd.Function):
    """y = x Wᵀ + b; x saved in 8 bits, only when W needs a gradient (the input gradient needs only W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, tracker: RangeTracker, cache: PackCache | None):
        # a parameter is held by the model anyway; a weight view (AST's W ⊙ M, computed per call) is a tensor of
        # its own that backward needs: saved as one, so that it is seen and accounted like every saved tensor
        view = weight.grad_fn is not None
        ctx.impl, ctx.weight, ctx.has_bias = tracker.impl, None if view else weight, bias is not None
        _save(ctx, [pack_with(tracker, x, cache)] if weight.requires_grad else [], (weight,) if view else ())
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        weight = ctx.weight if ctx.weight is not None else ctx.saved_tensors[2 * len(ctx.meta)]
        gx = gw = gb = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = g.matmul(weight.to(g.dtype))
        if ctx.meta and ctx.needs_input_grad[1]:
            (x,), _ = _restore(ctx, ctx.impl)
            gw = g2.t().matmul(x.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(weight.dtype)
        return gx, gw, gb, None, None


class MesaRMSNorm(torch.autograd.Function):
    """Llama-style RMSNorm, ``(w + offset) * (x·rsqrt(mean(x²) + eps)).to(dtype)`` with the statistics in fp32;
    x saved in 8 bits, 1/rms exact."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float, tracker: RangeTracker, cache: PackCache | None):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.impl, ctx.weight, ctx.offset = tracker.impl, weight, offset
        _save(ctx, [pack_with(tracker, x, cache)], (rstd,))
        return (weight + offset) * normed if offset else weight * normed

    @staticmethod
    def backward(ctx, g):
        (x,), (rstd,) = _restore(ctx, ctx.impl)
        weight = ctx.weight
        n = x.float() * rstd  # the normalised input, from the 8-bit x and the exact 1/rms
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * n.to(g.dtype)).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gn = (g * (weight + ctx.offset if ctx.offset else weight)).float()
            gx = (rstd * (gn - n * (gn * n).mean(-1, keepdim=True))).to(g.dtype)
        return gx, gw, None, None, None, None


class MesaLayerNorm(torch.autograd.Function):
    """``F.layer_norm`` over the last dimension; x saved in 8 bits, mean and 1/std exact (fp32, per row)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, tracker: RangeTracker, cache: PackCache | None):
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
        ctx.impl, ctx.weight, ctx.has_bias = tracker.impl, weight, bias is not None
        _save(ctx, [pack_with(tracker, x, cache)], (mean, rstd))
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def backward(ctx, g):
        (x,), (mean, rstd) = _restore(ctx, ctx.impl)
        weight = ctx.weight
        n = (x.float() - mean) * rstd
        gf = g.float()
        gw = gb = gx = None
        if weight is not None and ctx.needs_input_grad[1]:
            gw = (gf * n).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gf.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gn = gf * weight.float() if weight is not None else gf
            gx = (rstd * (gn - gn.mean(-1, keepdim=True) - n * (gn * n).mean(-1, keepdim=True))).to(g.dtype)
        return gx, gw, gb, None, None, None


def _vjp(fn: Callable, inputs: list[torch.Tensor], g: torch.Tensor, needs: list[bool]) -> list:
    leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
    with torch.enable_grad():
        out = fn(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, g) if wanted else ())
    return [next(grads) if t.requires_grad else None for t in leaves]


class MesaActivation(torch.autograd.Function):
    """y = act(x) for any elementwise activation module; x saved in 8 bits."""

    @staticmethod
    def forward(ctx, x, act: Callable, tracker: RangeTracker, cache: PackCache | None):
        ctx.impl, ctx.act = tracker.impl, act
        _save(ctx, [pack_with(tracker, x, cache)])
        return act(x)

    @staticmethod
    def backward(ctx, g):
        (x,), _ = _restore(ctx, ctx.impl)
        (gx,) = _vjp(ctx.act, [x], g, [True])
        return gx, None, None, None


class MesaGatedActivation(torch.autograd.Function):
    """y = act(gate) * up (SwiGLU / GeGLU); gate and up saved in 8 bits, the product's inputs recomputed."""

    @staticmethod
    def forward(ctx, gate, up, act: Callable, gate_tracker: RangeTracker, up_tracker: RangeTracker,
                cache: PackCache | None):
        ctx.impl, ctx.act = gate_tracker.impl, act
        _save(ctx, [pack_with(gate_tracker, gate, cache), pack_with(up_tracker, up, cache)])
        return act(gate) * up

    @staticmethod
    def backward(ctx, g):
        (gate, up), _ = _restore(ctx, ctx.impl)
        act = ctx.act
        ggate, gup = _vjp(lambda a, b: act(a) * b, [gate, up], g, list(ctx.needs_input_grad[:2]))
        return ggate, gup, None, None, None, None


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _fold_kv(g: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return g
    b, h, s, d = g.shape
    return g.reshape(b, h // n_rep, n_rep, s, d).sum(2)


class MesaAttention(torch.autograd.Function):
    """Eager attention ``softmax(q kᵀ·scaling + mask) v`` (softmax in fp32, as transformers' eager path) with
    q, k, v and the probabilities saved in 8 bits, one range per head; k and v keep their (grouped-query) head
    count. Returns ``[B, H, L, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling: float, trackers: dict[str, RangeTracker], cache: PackCache | None):
        n_rep = q.shape[1] // k.shape[1]
        s = torch.matmul(q, repeat_kv(k, n_rep).transpose(2, 3)) * scaling
        if mask is not None:
            s = s + mask
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(p, repeat_kv(v, n_rep))
        ctx.impl, ctx.scaling, ctx.n_rep = trackers["q"].impl, scaling, n_rep
        _save(ctx, [pack_with(trackers["q"], q, cache), pack_with(trackers["k"], k, cache),
                    pack_with(trackers["v"], v, cache), pack_with(trackers["p"], p, None)])
        return out

    @staticmethod
    def backward(ctx, g):
        (q, k, v, p), _ = _restore(ctx, ctx.impl)
        n_rep = ctx.n_rep
        kr, vr = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        gp = torch.matmul(g, vr.transpose(2, 3)).float()
        gv = _fold_kv(torch.matmul(p.transpose(2, 3), g), n_rep)
        pf = p.float()
        gs = (pf * (gp - (gp * pf).sum(-1, keepdim=True))).to(q.dtype) * ctx.scaling
        gq = torch.matmul(gs, kr)
        gk = _fold_kv(torch.matmul(gs.transpose(2, 3), q), n_rep)
        return gq, gk, gv, None, None, None, None
