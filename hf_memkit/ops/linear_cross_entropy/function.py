"""Autograd and the public :func:`linear_cross_entropy`.

Two autograd Functions share the backends (``reference`` = torch, ``triton``):

* ``_ScalarLossWithGrads`` — for a scalar loss (mean/sum) that needs gradients, the gradients are computed *in the
  forward pass*, while the logit chunks are hot, and only dE, dC (and dbias) are kept for backward, which merely
  scales them by the incoming gradient. No logit is ever recomputed, and no activation is saved.
* ``_RecomputeLoss`` — for ``reduction="none"`` (the upstream gradient differs per row and is unknown in the
  forward) and for evaluation without gradients: the forward keeps the per-row log-sum-exp, the backward
  recomputes the logits chunk by chunk.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import torch

from ...memory.tags import mark_parameter_gradient
from . import reference
from .problem import (LCEProblem, LinearCrossEntropyError, TokenStats, compute_dtype_of, default_budget,
                      resolve_filter_eps)

logger = logging.getLogger("hf_memkit")

IMPLS = ("auto", "torch", "triton")
REDUCTIONS = ("mean", "sum", "none")
_logged: set[tuple[str, str]] = set()


# ---------------------------------------------------------------------------------------------------------------
# implementation switch


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can). On CPU they run only under the
    Triton interpreter (TRITON_INTERPRET=1), which is meant for tests."""
    if importlib.util.find_spec("triton") is None:
        return "the package `triton` is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the tensors are on {device.type}; the Triton kernels need CUDA (or TRITON_INTERPRET=1 for tests)"


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` picks Triton on CUDA when it is installed, the torch reference otherwise. Logged once per
    (implementation, device type)."""
    if impl not in IMPLS:
        raise LinearCrossEntropyError(f"impl={impl!r} is not an implementation; use one of {', '.join(IMPLS)}")
    if impl == "auto":
        ok = device.type == "cuda" and dtype != torch.float64 and triton_unavailable_reason(device) is None
        chosen = "triton" if ok else "torch"
    elif impl == "triton":
        reason = triton_unavailable_reason(device)
        if reason is None and dtype == torch.float64:
            reason = "the Triton kernels take fp16, bf16 or fp32 inputs, not fp64"
        if reason is not None:
            raise LinearCrossEntropyError(f"impl='triton' cannot run: {reason}. Use impl='auto' or impl='torch'")
        chosen = "triton"
    else:
        chosen = "torch"
    key = (chosen, device.type)
    if key not in _logged:
        _logged.add(key)
        logger.info("hf_memkit: linear_cross_entropy runs impl=%s on %s (requested %s)", chosen, device.type, impl)
    return chosen


def _backend(impl: str):
    if impl == "triton":
        from . import triton as backend  # imported here: `import hf_memkit` must never import triton

        return backend
    return reference


# ---------------------------------------------------------------------------------------------------------------
# autograd


def _cast(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or like is None:
        return None
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _stats_elsewhere(prob: LCEProblem, backend) -> None:
    """The torch backend fills ``prob.stats`` inside its own chunked pass; after the Triton kernels (whose numerics
    and speed stay as they are) a forward-only chunked torch pass computes them: one more pass over the logits,
    paid only when statistics are asked for."""
    if prob.stats is not None and backend is not reference:
        reference.token_stats(prob)


def _no_autocast(device: torch.device):
    # the backends choose their own precision (fp32 accumulation); autocast would turn their matmuls into bf16
    return torch.autocast(device_type=device.type, enabled=False)


class _ScalarLossWithGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, c, bias, prob: LCEProblem, backend, scale, needs):
        with _no_autocast(e.device):
            loss_sum, _, de, dc, db = backend.fused(prob, scale, *needs)
            _stats_elsewhere(prob, backend)
        de, dc, db = _cast(de, e), _cast(dc, c), _cast(db, bias)
        for grad, inp in ((dc, c), (db, bias)):
            # backward hands these buffers to autograd unchanged (scaled in place): for a leaf parameter they
            # become its .grad, so the memory accounting counts them as gradients, not as saved activations
            if grad is not None and inp.is_leaf and inp.requires_grad:
                mark_parameter_gradient(grad)
        ctx.save_for_backward(de, dc, db)
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad):
        # in place: a second backward through a retained graph fails loudly (version counter) instead of
        # returning gradients scaled twice
        out = []
        for t in ctx.saved_tensors:
            # a 16-bit dC (a 16-bit classifier under fp32 hidden states) is scaled by the fp32 upstream gradient
            # in fp32 and rounded once more: exact for the usual upstream 1, within one ulp otherwise
            out.append(None if t is None else t.mul_(grad if t.element_size() < grad.element_size()
                                                     else grad.to(t.dtype)))
        return out[0], out[1], out[2], None, None, None, None


class _RecomputeLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, c, bias, prob: LCEProblem, backend, reduction, scale, out_shape, want_avg):
        with _no_autocast(e.device):
            if want_avg:
                lse, z, avg = backend.lse_and_target(prob, want_avg=True)
            else:
                lse, z = backend.lse_and_target(prob)[:2]
                avg = None
            _stats_elsewhere(prob, backend)
        rows_loss = reference._row_losses(lse, z, prob.z_loss)
        if reduction == "none":
            out = torch.zeros(out_shape.numel(), dtype=prob.compute_dtype, device=e.device)
            if prob.rows is None:
                out.copy_(rows_loss)
            else:
                out[prob.rows] = rows_loss
            out = out.view(out_shape)
        else:
            out = rows_loss.sum() * scale
        order = torch.argsort(avg, descending=True).to(torch.int32) if avg is not None else None
        ctx.save_for_backward(e, c, bias, prob.rows, prob.y, lse, order, scale)
        ctx.meta = (backend, reduction, prob.softcap, prob.z_loss, prob.filter_eps, prob.budget,
                    prob.compute_dtype, prob.vocab_sort)
        return out

    @staticmethod
    def backward(ctx, grad):
        e, c, bias, rows, y, lse, order, scale = ctx.saved_tensors
        backend, reduction, softcap, z_loss, eps, budget, cdt, vocab_sort = ctx.meta
        prob = LCEProblem(e, c, bias, rows, y, softcap, z_loss, eps, budget, cdt, vocab_sort)
        if reduction == "none":
            g = grad.reshape(-1)
            row_scale = (g if rows is None else g.index_select(0, rows)).to(cdt)
        else:
            row_scale = (grad * scale).to(cdt)
        need_e, need_c, need_bias = ctx.needs_input_grad[:3]
        with _no_autocast(e.device):
            de, dc, db = backend.grads(prob, lse, row_scale, need_e, need_c, need_bias, vocab_order=order)
        return _cast(de, e), _cast(dc, c), _cast(db, bias), None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# the public function


def _check(e, c, targets, bias, reduction, shift, softcap, z_loss, num_items_in_batch, filter_eps) -> int:
    def bad(msg: str) -> LinearCrossEntropyError:
        return LinearCrossEntropyError(f"linear_cross_entropy: {msg}")

    for name, t in (("e", e), ("c", c), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise bad(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if e.dim() < 2:
        raise bad(f"`e` (hidden states) must be (..., D), got shape {tuple(e.shape)}; add a batch dimension")
    if c.dim() != 2 or c.shape[1] != e.shape[-1]:
        raise bad(f"`c` (classifier) must be (V, D) with D = e.shape[-1] = {e.shape[-1]}, got {tuple(c.shape)}")
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise bad(f"`targets` must have e's leading shape {tuple(e.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dtype.is_complex:
        raise bad(f"`targets` must hold integer class indices, got dtype {targets.dtype}; pass labels.long()")
    if not (e.dtype.is_floating_point and c.dtype.is_floating_point):
        raise bad(f"`e` and `c` must be floating point, got {e.dtype} and {c.dtype}")
    if e.device != c.device or targets.device != e.device:
        raise bad(f"e, c and targets must be on one device, got {e.device}, {c.device}, {targets.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c.shape[0],)):
        raise bad(f"`bias` must be a ({c.shape[0]},) tensor (one entry per class) or None")
    if bias is not None and bias.device != e.device:
        raise bad(f"`bias` is on {bias.device}, e on {e.device}; move it to e's device")
    if reduction not in REDUCTIONS:
        raise bad(f"reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if isinstance(shift, bool):
        shift = int(shift)
    if not isinstance(shift, int) or shift < 0:
        raise bad(f"shift={shift!r} must be False/True or a non-negative int (1 = next-token prediction)")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise bad(f"softcap={softcap!r} must be a positive number or None")
    if not isinstance(z_loss, (int, float)) or z_loss < 0:
        raise bad(f"z_loss={z_loss!r} must be a number >= 0 (0 disables it)")
    if num_items_in_batch is not None and reduction != "mean":
        raise bad(
            f"num_items_in_batch replaces the denominator of reduction='mean'; it has no meaning with "
            f"reduction={reduction!r}. Pass reduction='mean', or drop num_items_in_batch"
        )
    if not (filter_eps is None or filter_eps == "auto" or (isinstance(filter_eps, (int, float)) and filter_eps >= 0)):
        raise bad(f"filter_eps={filter_eps!r} must be 'auto', a number >= 0, or None (no filtering)")
    return shift


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool | int = False,
    z_loss: float = 0.0,
    filter_eps: float | str | None = "auto",
    num_items_in_batch: Any = None,
    impl: str = "auto",
    *,
    memory_budget: int | None = None,
    vocab_sort: bool = True,
    token_stats: TokenStats | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits ``e @ c.T (+ bias)`` against ``targets``, without materialising the logits.

    Equals ``F.cross_entropy((e @ c.T + bias).float(), targets, ignore_index=..., reduction=...)``, with:

    * ``e`` (..., D) hidden states, ``c`` (V, D) classifier (``lm_head.weight``), ``targets`` (...) class indices.
    * ``softcap``: logits become ``softcap · tanh(logits / softcap)`` first (Gemma 2).
    * ``shift``: position t predicts ``targets[..., t + shift]`` (``True`` = 1, next-token prediction); the last
      ``shift`` positions are ignored. No copy of ``e`` is made.
    * ``reduction``: ``mean`` over non-ignored targets, ``sum``, or ``none`` (shape of ``targets``; 0 at ignored
      positions).
    * ``num_items_in_batch``: Hugging Face gradient-accumulation semantics — ``sum / num_items_in_batch``
      (``reduction="mean"`` only).
    * ``z_loss``: adds ``z_loss · logsumexp(logits)²`` per token (PaLM's auxiliary loss).
    * ``filter_eps``: gradient entries of the softmax below this magnitude are skipped by whole vocabulary
      blocks (per-row error at most ``filter_eps · Σ_j ‖c_j‖``). ``"auto"``: 2^-12 for bf16, 2^-15 for fp16
      inputs, no filtering for fp32/fp64. ``None`` or 0 disables it.
    * ``impl``: ``auto`` (Triton on CUDA, torch elsewhere; resolved now and logged once), ``torch`` or ``triton``.
    * ``memory_budget``: bytes the torch path may spend per logit chunk (default: half of the fp32 dC buffer,
      see :func:`~.problem.default_budget`); the chunk sizes follow from it.
    * ``vocab_sort``: the Triton backward visits the vocabulary sorted by average logit so that filtered
      blocks cluster (ignored by the torch path).
    * ``token_stats``: a :class:`~.problem.TokenStats` to fill, without gradient, with the summed softmax entropy,
      the argmax hits and the count of the non-ignored targets (what TRL logs as ``entropy`` and
      ``mean_token_accuracy``); the torch path accumulates them in its chunked pass, after Triton a forward-only
      torch pass does. None (default): not computed.

    Accumulation is in fp32 (fp64 for fp64 inputs); the loss is returned in that dtype.

    A 16-bit ``c`` with fp32 ``e`` (16-bit weight storage, fp32 compute: ``precision: {bf16: {}}``) is computed
    in fp32 without an fp32 copy of ``c``: the torch path upcasts it block by block and rounds dC into a 16-bit
    tensor block by block (:mod:`.blocked`; the logits are computed twice unless one tile holds the whole
    problem), the Triton kernels upcast each tile as they load it but accumulate dC in an fp32 (V, D) buffer
    (their atomic adds need one). ``filter_eps="auto"`` follows ``e``'s dtype there (no filtering for fp32). For a
    scalar loss dC is rounded to 16 bits in the forward; an upstream gradient other than 1 rescales it there
    (one more rounding, within one ulp in all).
    """
    k = _check(e, c, targets, bias, reduction, shift, softcap, z_loss, num_items_in_batch, filter_eps)
    if token_stats is not None and not isinstance(token_stats, TokenStats):
        raise LinearCrossEntropyError(
            f"linear_cross_entropy: token_stats must be a TokenStats (or None), got {type(token_stats).__name__}")
    in_dtype = e.dtype if e.element_size() <= c.element_size() else c.dtype
    chosen = resolve_impl(impl, e.device, in_dtype)
    # a 16-bit classifier with fp32 hidden states (16-bit weight storage, fp32 compute) keeps fp32 numerics:
    # gradient filtering follows the hidden states' dtype, and no backend makes an fp32 copy of c
    wide_e = e.element_size() > c.element_size()
    backend = _backend(chosen)
    cdt = compute_dtype_of(e.dtype, c.dtype)

    D, V = e.shape[-1], c.shape[0]
    tgt = reference.shift_targets(targets, k, ignore_index).reshape(-1)
    e2 = e.reshape(-1, D)  # a view for contiguous hidden states
    valid = tgt != ignore_index
    n_valid = int(valid.sum())
    rows = None if n_valid == tgt.numel() else valid.nonzero().squeeze(1)
    y = tgt if rows is None else tgt.index_select(0, rows)
    if n_valid:
        lo, hi = (int(t) for t in torch.aminmax(y))
        if lo < 0 or hi >= V:
            raise LinearCrossEntropyError(
                f"linear_cross_entropy: targets hold class indices outside [0, {V}) (min {lo}, max {hi}); mark "
                f"padding with ignore_index={ignore_index} or fix the labels"
            )
    y = y.long()
    if chosen == "triton" and e.dtype != c.dtype and not wide_e:
        # as autocast would: compute in the narrower dtype (16-bit hidden states, wider classifier). The other
        # way round (fp32 e, 16-bit c) the kernels upcast each c tile as they load it
        e2, c = e2, c.to(e2.dtype)
        if bias is not None:
            bias = bias.to(e2.dtype)
    budget = int(memory_budget) if memory_budget else default_budget(e.device, V, D)
    eps = resolve_filter_eps(filter_eps, e.dtype if wide_e else in_dtype)
    prob = LCEProblem(e2, c, bias, rows, y, float(softcap) if softcap is not None else None, float(z_loss),
                      eps, budget, cdt, vocab_sort, token_stats)
    if token_stats is not None:
        token_stats.zero(e.device)  # defined sums even when no target counts; the passes add to them

    if reduction == "mean":
        denom = num_items_in_batch if num_items_in_batch is not None else n_valid
        scale = 1.0 / torch.as_tensor(denom, dtype=cdt, device=e.device)
    else:
        scale = torch.ones((), dtype=cdt, device=e.device)

    tensors = [t for t in (e2, c, bias) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if reduction != "none" and needs_grad:
        needs = (e2.requires_grad, c.requires_grad, bias is not None and bias.requires_grad)
        return _ScalarLossWithGrads.apply(e2, c, bias, prob, backend, scale, needs)
    want_avg = chosen == "triton" and needs_grad and prob.filter_eps is not None and vocab_sort
    return _RecomputeLoss.apply(e2, c, bias, prob, backend, reduction, scale, targets.shape, want_avg)
