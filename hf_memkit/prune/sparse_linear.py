"""How AST and CAST change an ``nn.Linear`` during training, reversibly and without changing its type or its
state-dict keys (the forward is overridden on the instance; ``remove`` deletes the override).

* ``sparse_mask`` (non-persistent bool buffer ``[out, in]``): the current 2:4 mask, recomputed by a callback.
* AST forward: ``y = x (W ⊙ M)ᵀ + b`` through :class:`MaskSTE`, whose backward hands the gradient of ``W ⊙ M``
  to ``W`` unmasked (straight-through: pruned weights keep receiving the dense gradient and can regrow), plus the
  optional SLoRB branch ``+ S · (P x)`` where ``(P x)_r = Σ_{j in group r} x_j`` (groups of ``k`` inputs) and ``S``
  (``slorb_S``, ``[out, in/k]``) is a trainable parameter.
* CAST forward: dense, ``y = x (W ⊙ A)ᵀ + b`` with ``A`` (``cast_scale``, ``[out, n]``, initialised to 1) one
  learnable scalar per row and column group; the mask only steers the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

MASK = "sparse_mask"
SLORB = "slorb_S"
SCALE = "cast_scale"
_ORIG = "_memkit_sparse_kind"


class MaskSTE(torch.autograd.Function):
    """``W ⊙ M`` forward, identity backward (the gradient w.r.t. ``W`` is the dense-matmul gradient)."""

    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def slorb_project(x: torch.Tensor, k: int) -> torch.Tensor:
    """``P x`` for the block indicator P (row r sums inputs ``[rk, rk+k)``)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // k, k).sum(-1)


def slorb_matrix(in_features: int, k: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The indicator ``P`` (``[in/k, in]``) as a matrix: the PEFT ``lora_A`` of the exported adapter."""
    return torch.repeat_interleave(torch.eye(in_features // k, dtype=dtype, device=device), k, dim=1)


def expand_scale(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    return scale.repeat_interleave(in_features // scale.shape[1], dim=1)


class MaskedLinear(torch.autograd.Function):
    """``y = x (W ⊙ M)ᵀ + b`` saving only ``x`` (the parameter and the mask buffer are kept anyway), so the
    masked layer keeps no more for backward than a plain Linear. ``dW = dyᵀ x`` unmasked (straight-through)."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        ctx.save_for_backward(x, weight, mask)
        ctx.has_bias = bias is not None
        return F.linear(x, weight * mask.to(weight.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mask = ctx.saved_tensors
        dx = dy @ (weight * mask.to(weight.dtype)) if ctx.needs_input_grad[0] else None
        dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, dw, None, db


class ScaledLinear(torch.autograd.Function):
    """``y = x (W ⊙ A⊗1)ᵀ + b`` with ``A [out, n]`` one scale per row and column group, saving only ``x``."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(x, weight, scale)
        ctx.has_bias = bias is not None
        return F.linear(x, weight * expand_scale(scale, weight.shape[1]).to(weight.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale = ctx.saved_tensors
        full = expand_scale(scale, weight.shape[1]).to(weight.dtype)
        dx = dy @ (weight * full) if ctx.needs_input_grad[0] else None
        g = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        dw = g * full if ctx.needs_input_grad[1] else None
        ds = (g * weight).reshape(scale.shape[0], scale.shape[1], -1).sum(-1) if ctx.needs_input_grad[2] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, dw, ds, db


def _ast_weight(self):
    return MaskSTE.apply(self.weight, self.sparse_mask.to(self.weight.dtype))


def _ast_extra(self, x):
    s = self._parameters.get(SLORB)
    return None if s is None else F.linear(slorb_project(x, self.memkit_slorb_k), s.to(x.dtype))


def _ast_forward(self, x):
    y = MaskedLinear.apply(x, self.weight, self.sparse_mask, self.bias)
    extra = _ast_extra(self, x)
    return y if extra is None else y + extra


class ScaledWeight(torch.autograd.Function):
    """``W ⊙ (A⊗1)`` as a weight view, saving only the two parameters (autograd's product would also keep the
    weight-sized expanded scale): ``dW = G ⊙ (A⊗1)``, ``dA = Σ_group G ⊙ W``."""

    @staticmethod
    def forward(ctx, weight, scale):
        ctx.save_for_backward(weight, scale)
        return weight * expand_scale(scale, weight.shape[1]).to(weight.dtype)

    @staticmethod
    def backward(ctx, g):
        weight, scale = ctx.saved_tensors
        dw = g * expand_scale(scale, weight.shape[1]).to(g.dtype) if ctx.needs_input_grad[0] else None
        ds = (g * weight).reshape(scale.shape[0], scale.shape[1], -1).sum(-1).to(scale.dtype) \
            if ctx.needs_input_grad[1] else None
        return dw, ds


def _cast_weight(self):
    return ScaledWeight.apply(self.weight, self.cast_scale)


def _cast_forward(self, x):
    return ScaledLinear.apply(x, self.weight, self.cast_scale, self.bias)


def install_(linear: Any, mask: torch.Tensor, kind: str, *, slorb_k: int | None = None, scale_groups: int = 2) -> None:
    """Install AST's or CAST's weight view on ``linear`` through the patching layer (part ``linear.view``): alone,
    its fused forward runs (saving only ``x``); under a kernel (Mesa's 8-bit saving, WTA-CRS), the kernel
    computes with the masked or scaled weight, straight-through as here."""
    from ..integrations.patching import Part, claim

    linear.register_buffer(MASK, mask.to(device=linear.weight.device, dtype=torch.bool), persistent=False)
    setattr(linear, _ORIG, kind)
    if kind == "ast":
        if slorb_k:
            linear.memkit_slorb_k = slorb_k
            linear.register_parameter(SLORB, torch.nn.Parameter(slorb_init(linear.weight, mask, slorb_k)))
        view = Part(kind, weight=_ast_weight, fused=_ast_forward, extra=_ast_extra)
    else:
        linear.register_parameter(SCALE, torch.nn.Parameter(
            torch.ones(linear.out_features, scale_groups, dtype=linear.weight.dtype, device=linear.weight.device)))
        view = Part(kind, weight=_cast_weight, fused=_cast_forward)
    claim(linear, "linear.view", view)


def uninstall_(linear: Any) -> None:
    """Back to a plain ``nn.Linear`` (weight values are left as they are)."""
    from ..integrations.patching import parts_of, unclaim

    view = parts_of(linear).get("linear.view")
    if view is not None:
        unclaim(linear, "linear.view", view.owner)
    linear._buffers.pop(MASK, None)
    linear._parameters.pop(SLORB, None)
    linear._parameters.pop(SCALE, None)
    for a in (_ORIG, "memkit_slorb_k"):
        if hasattr(linear, a):
            delattr(linear, a)


def slorb_init(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """``S[o, r]`` = mean over the ``k`` inputs of group r of the pruned part ``W ⊙ (1 − M)`` (AST's
    initialisation: at step 0 the branch adds back each group's average pruned weight times its input sum)."""
    pruned = weight.detach() * (~mask.to(weight.device, torch.bool)).to(weight.dtype)
    return pruned.reshape(weight.shape[0], weight.shape[1] // k, k).mean(-1).clone()


def effective_weight(linear: Any) -> torch.Tensor:
    if SCALE in linear._parameters:
        return linear.weight * expand_scale(linear.cast_scale, linear.in_features)
    return linear.weight
