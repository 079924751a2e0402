"""Cut Cross-Entropy kernels in Triton (CUDA; on CPU only under TRITON_INTERPRET=1, for tests).

Imported lazily by ``function.py`` — never by ``import hf_memkit``.

* ``_lse_kernel``: each program owns a block of rows and a contiguous split of the vocabulary; it computes the
  logit tiles in registers (matmul over D in BLOCK_D steps, fp32 accumulation), applies bias and softcap, and
  keeps an online log-sum-exp. The per-split results (n × splits floats) are merged with one ``logsumexp``:
  no locks, deterministic, and enough programs to fill the GPU even for few rows. Optionally accumulates the
  per-vocabulary logit sums used to sort the vocabulary for the backward.
* ``_target_kernel``: the indexed dot z_i = e_i · c_{y_i} (+ bias, softcap).
* ``_grad_kernel``: per (row block, vocabulary block) tile, recompute the logits, form
  S = softmax·(1 + 2·z_loss·lse) − onehot, skip the tile when every |S| < eps (gradient filtering), otherwise
  scale, apply the softcap chain rule and atomically add S·C into dE and Sᵀ·E into dC (fp32 buffers).
  Vocabulary blocks are visited through ``order`` (vocabulary sorted by average logit), so that the entries
  that matter cluster into few tiles and the rest are skipped whole.

A 16-bit classifier with fp32 hidden states (16-bit weight storage) is read as is and each tile upcast to
fp32 in registers; dC still accumulates in an fp32 (V, D) buffer (the atomic adds need it) and is cast at the end.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .problem import LCEProblem

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tanh(x):
    # portable tanh (no libdevice in the interpreter); saturates correctly at +-inf
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter multiplies bf16 tiles as raw bits: give it fp32 (bf16 products are exact there)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logit_tile(E, C, Bias, rows, vid, mask_b, mask_v, D, stride_e, stride_c, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_B, BLOCK_V) fp32 logits of rows ``rows`` and vocabulary ids ``vid``; also tanh(a/cap) for the
    chain rule (zeros without softcap)."""
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        e_t = tl.load(E + rows[:, None] * stride_e + offs_d[None, :], mask=mask_b[:, None] & mask_d[None, :],
                      other=0.0)
        c_t = tl.load(C + vid[:, None] * stride_c + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :],
                      other=0.0).to(E.dtype.element_ty)  # a 16-bit classifier under fp32 hidden states: upcast
        acc = _dot(e_t, tl.trans(c_t), acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(Bias + vid, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    t = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    if SOFTCAP:
        t = _tanh(acc / softcap)
        acc = t * softcap
    return acc, t


@triton.jit
def _lse_kernel(E, C, Bias, Rows, Part, Avg, n, V, D, stride_e, stride_c, softcap, blocks_per_split, num_splits,
                HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WANT_AVG: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < n
    if HAS_ROWS:
        rows = tl.load(Rows + offs_b, mask=mask_b, other=0).to(tl.int64)
    else:
        rows = tl.where(mask_b, offs_b, 0).to(tl.int64)
    m = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for i in range(0, blocks_per_split):
        offs_v = (pid_s * blocks_per_split + i) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        vid = tl.where(mask_v, offs_v, 0).to(tl.int64)
        a, _t = _logit_tile(E, C, Bias, rows, vid, mask_b, mask_v, D, stride_e, stride_c, softcap,
                            HAS_BIAS, SOFTCAP, PRECISION, UPCAST, BLOCK_B, BLOCK_V, BLOCK_D)
        if WANT_AVG:
            tl.atomic_add(Avg + offs_v, tl.sum(tl.where(mask_b[:, None], a, 0.0), axis=0), mask=mask_v)
        a = tl.where(mask_v[None, :], a, float("-inf"))
        m_new = tl.maximum(m, tl.max(a, axis=1))
        # a split's first block always holds a real column, so m_new is finite and no (-inf) - (-inf) occurs
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(a - m_new[:, None]), axis=1)
        m = m_new
    tl.store(Part + offs_b * num_splits + pid_s, m + tl.log(s), mask=mask_b)


@triton.jit
def _target_kernel(E, C, Bias, Rows, Y, Z, n, D, stride_e, stride_c, softcap,
                   HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < n
    if HAS_ROWS:
        rows = tl.load(Rows + offs_b, mask=mask_b, other=0).to(tl.int64)
    else:
        rows = tl.where(mask_b, offs_b, 0).to(tl.int64)
    y = tl.load(Y + offs_b, mask=mask_b, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_b[:, None] & (offs_d < D)[None, :]
        e_t = tl.load(E + rows[:, None] * stride_e + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        c_t = tl.load(C + y[:, None] * stride_c + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(e_t * c_t, axis=1)
    if HAS_BIAS:
        acc += tl.load(Bias + y, mask=mask_b, other=0.0).to(tl.float32)
    if SOFTCAP:
        acc = _tanh(acc / softcap) * softcap
    tl.store(Z + offs_b, acc, mask=mask_b)


@triton.jit
def _grad_kernel(E, C, Bias, Rows, Y, Lse, Scale, Order, DE, DC, DB, n, V, D, stride_e, stride_c, softcap,
                 z_loss, eps,
                 HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr,
                 PER_ROW: tl.constexpr, FILTER: tl.constexpr, HAS_ORDER: tl.constexpr, NEED_E: tl.constexpr,
                 NEED_C: tl.constexpr, NEED_B: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < n
    if HAS_ROWS:
        rows = tl.load(Rows + offs_b, mask=mask_b, other=0).to(tl.int64)
    else:
        rows = tl.where(mask_b, offs_b, 0).to(tl.int64)
    y = tl.load(Y + offs_b, mask=mask_b, other=-1)
    lse = tl.load(Lse + offs_b, mask=mask_b, other=0.0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    if HAS_ORDER:
        vid = tl.load(Order + offs_v, mask=mask_v, other=0).to(tl.int64)
    else:
        vid = tl.where(mask_v, offs_v, 0).to(tl.int64)
    a, t = _logit_tile(E, C, Bias, rows, vid, mask_b, mask_v, D, stride_e, stride_c, softcap,
                       HAS_BIAS, SOFTCAP, PRECISION, UPCAST, BLOCK_B, BLOCK_V, BLOCK_D)
    p = tl.exp(a - lse[:, None])
    if Z_LOSS:
        p = p * (1.0 + 2.0 * z_loss * lse)[:, None]
    s = p - tl.where(vid[None, :] == y[:, None], 1.0, 0.0)
    s = tl.where(mask_b[:, None] & mask_v[None, :], s, 0.0)
    keep = True
    if FILTER:
        keep = tl.max(tl.abs(s)) >= eps
    if keep:
        if PER_ROW:
            g = tl.load(Scale + offs_b, mask=mask_b, other=0.0)
            s = s * g[:, None]
        else:
            s = s * tl.load(Scale)
        if SOFTCAP:
            s = s * (1.0 - t * t)
        if NEED_B:
            tl.atomic_add(DB + vid, tl.sum(s, axis=0), mask=mask_v)
        sd = s.to(E.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            if NEED_E:
                c_t = tl.load(C + vid[:, None] * stride_c + offs_d[None, :],
                              mask=mask_v[:, None] & mask_d[None, :], other=0.0).to(E.dtype.element_ty)
                de = _dot(sd, c_t, tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32), PRECISION, UPCAST)
                tl.atomic_add(DE + rows[:, None] * D + offs_d[None, :], de, mask=mask_b[:, None] & mask_d[None, :])
            if NEED_C:
                e_t = tl.load(E + rows[:, None] * stride_e + offs_d[None, :],
                              mask=mask_b[:, None] & mask_d[None, :], other=0.0)
                dc = _dot(tl.trans(sd), e_t, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), PRECISION, UPCAST)
                tl.atomic_add(DC + vid[:, None] * D + offs_d[None, :], dc, mask=mask_v[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------------------------
# launchers (same interface as reference.py)


def _blocks(dtype: torch.dtype) -> dict:
    if _INTERPRET:  # numpy executes each program: fewer, larger programs are faster, 16 is tl.dot's minimum
        return {"BLOCK_B": 32, "BLOCK_V": 32, "BLOCK_D": 32}
    return {"BLOCK_B": 64, "BLOCK_V": 128, "BLOCK_D": 64 if dtype == torch.float32 else 32}


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs get exact fp32 products (no TF32), as F.cross_entropy on fp32 logits would
    return "ieee" if dtype == torch.float32 else None


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype != torch.float32


def _prepare(p: LCEProblem):
    e = p.e if p.e.stride(-1) == 1 else p.e.contiguous()
    c = p.c.contiguous()
    rows = p.rows if p.rows is not None else p.y  # placeholder pointer when unused
    bias = p.bias if p.bias is not None else c  # placeholder pointer when unused
    return e, c, rows, bias


def _num_splits(row_blocks: int, vocab_blocks: int, device: torch.device) -> int:
    if _INTERPRET or device.type != "cuda":
        return min(vocab_blocks, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_blocks, triton.cdiv(4 * sms, max(row_blocks, 1))))


def lse_and_target(p: LCEProblem, want_avg: bool = False):
    """(lse, z, logit_sum or None), each in fp32: log-sum-exp and target logit per valid row, and the
    per-vocabulary logit sums (only when ``want_avg``, for sorting)."""
    e, c, rows, bias = _prepare(p)
    n, V, D = p.n, p.vocab, e.shape[1]
    dev = e.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    z = torch.empty(n, dtype=torch.float32, device=dev)
    avg = torch.zeros(V, dtype=torch.float32, device=dev) if want_avg else None
    if n == 0:
        return lse, z, avg
    blk = _blocks(e.dtype)
    row_blocks = triton.cdiv(n, blk["BLOCK_B"])
    vocab_blocks = triton.cdiv(V, blk["BLOCK_V"])
    splits = _num_splits(row_blocks, vocab_blocks, dev)
    per_split = triton.cdiv(vocab_blocks, splits)
    splits = triton.cdiv(vocab_blocks, per_split)  # every split starts on a real block
    part = torch.empty(n, splits, dtype=torch.float32, device=dev)
    softcap = p.softcap or 1.0
    _lse_kernel[(row_blocks, splits)](
        e, c, bias, rows, part, avg if avg is not None else lse, n, V, D, e.stride(0), c.stride(0), softcap,
        per_split, splits, HAS_ROWS=p.rows is not None, HAS_BIAS=p.bias is not None,
        SOFTCAP=p.softcap is not None, WANT_AVG=want_avg, PRECISION=_precision(e.dtype), UPCAST=_upcast(e.dtype), **blk,
    )
    torch.logsumexp(part, dim=1, out=lse)
    _target_kernel[(row_blocks,)](
        e, c, bias, rows, p.y, z, n, D, e.stride(0), c.stride(0), softcap, HAS_ROWS=p.rows is not None,
        HAS_BIAS=p.bias is not None, SOFTCAP=p.softcap is not None, BLOCK_B=blk["BLOCK_B"],
        BLOCK_D=blk["BLOCK_D"],
    )
    return lse, z, avg


def grads(p: LCEProblem, lse: torch.Tensor, row_scale: torch.Tensor, need_e: bool, need_c: bool,
          need_bias: bool, vocab_order: torch.Tensor | None = None):
    """dE (N, D), dC (V, D), dbias (V,) as fp32 buffers (None where not needed)."""
    e, c, rows, bias = _prepare(p)
    n, V, D = p.n, p.vocab, e.shape[1]
    dev = e.device
    de = torch.zeros(e.shape[0], D, dtype=torch.float32, device=dev) if need_e else None
    dc = torch.zeros(V, D, dtype=torch.float32, device=dev) if need_c else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_bias and p.bias is not None else None
    if n == 0 or not (need_e or need_c or db is not None):
        return de, dc, db
    blk = _blocks(e.dtype)
    per_row = row_scale.dim() == 1
    scale = row_scale.to(torch.float32).reshape(-1).contiguous()
    order = vocab_order if (vocab_order is not None and p.filter_eps is not None) else None
    dummy = lse
    grid = (triton.cdiv(n, blk["BLOCK_B"]), triton.cdiv(V, blk["BLOCK_V"]))
    _grad_kernel[grid](
        e, c, bias, rows, p.y, lse.to(torch.float32), scale, order if order is not None else p.y,
        de if de is not None else dummy, dc if dc is not None else dummy, db if db is not None else dummy,
        n, V, D, e.stride(0), c.stride(0), p.softcap or 1.0, p.z_loss, p.filter_eps or 0.0,
        HAS_ROWS=p.rows is not None, HAS_BIAS=p.bias is not None, SOFTCAP=p.softcap is not None,
        Z_LOSS=bool(p.z_loss), PER_ROW=per_row, FILTER=p.filter_eps is not None, HAS_ORDER=order is not None,
        NEED_E=de is not None, NEED_C=dc is not None, NEED_B=db is not None, PRECISION=_precision(e.dtype),
        UPCAST=_upcast(e.dtype), **blk,
    )
    return de, dc, db


def fused(p: LCEProblem, scale: torch.Tensor, need_e: bool, need_c: bool, need_bias: bool):
    """The scalar-loss path: log-sum-exp, then the gradient kernel right away (scaled by ``scale``; backward
    only multiplies by the incoming gradient). Returns (loss_sum, lse, dE, dC, dbias)."""
    sort = p.filter_eps is not None and p.vocab_sort
    lse, z, avg = lse_and_target(p, want_avg=sort)
    loss = lse - z
    if p.z_loss:
        loss = loss + p.z_loss * lse.square()
    order = torch.argsort(avg, descending=True).to(torch.int32) if avg is not None else None
    de, dc, db = grads(p, lse, scale.to(torch.float32), need_e, need_c, need_bias, vocab_order=order)
    return loss.sum(), lse, de, dc, db
