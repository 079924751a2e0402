"""The torch backend for a 16-bit classifier (``c`` in bf16/fp16, accumulation in fp32): no fp32 copy of ``c`` and
no full-size fp32 ``dC``.

The dense path (:mod:`.reference`) upcasts ``c`` whole (V·D·4 bytes) and accumulates ``dC`` over row chunks in an
fp32 (V, D) buffer. Here the vocabulary is walked in *blocks* of rows of ``c``, each upcast once into a small fp32
buffer (at most :data:`WEIGHT_BLOCK_BYTES`), and the loops run vocabulary-outer, rows-inner:

* log-sum-exp (:func:`lse_and_target`): an online log-sum-exp per row over the blocks;
* gradients (:func:`grads`): for each block, every row chunk adds its share of ``dC`` into an fp32 *block*
  accumulator, which is rounded once into the 16-bit ``dC`` (the returned gradient, already in ``c``'s dtype);
  ``dE`` is an fp32 (N, D) buffer as on the dense path;
* the scalar-loss sweep (:func:`fused`): when one tile holds every row and the whole vocabulary within the
  budget, a single pass (logits once, three matmuls, like the dense path); otherwise the log-sum-exp pass and the
  gradient pass, i.e. the logits are computed twice (four matmuls instead of three). That extra matmul is the
  price of not holding a (V, D) fp32 accumulator across row chunks (113 MiB for SmolLM2's 49152x576 head).

Transient memory: two fp32 weight blocks (the upcast block and its dC accumulator), one logit tile within the
budget, and the (N, D) fp32 dE; see :func:`transient_bytes`. Rounding: every dC entry is accumulated in fp32 over
all rows and rounded once, exactly as the dense path's final cast.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .problem import LCEProblem
from .reference import (MIN_ROWS, MIN_VOCAB, _entropy, _logits_into, _OnlineStats, _row_chunk, _row_losses,
                        _score_to_grad, _target_logits)

MiB = 2**20
#: fp32 bytes of one upcast block of ``c`` (and of its dC accumulator)
WEIGHT_BLOCK_BYTES = 16 * MiB


def applies(p: LCEProblem) -> bool:
    """The classifier is stored narrower than the accumulation dtype (bf16/fp16 ``c``)."""
    return p.c.element_size() < torch.finfo(p.compute_dtype).bits // 8


def _elem(cdt: torch.dtype) -> int:
    return torch.finfo(cdt).bits // 8


def plan(n: int, vocab: int, hidden: int, cdt: torch.dtype, budget: int, buffers: int) -> tuple[int, int]:
    """(vocabulary rows per weight block, token rows per tile): a block's fp32 copy within
    min(WEIGHT_BLOCK_BYTES, budget / 2), a (rows x block) logit tile (``buffers`` of them) within the budget."""
    elem = _elem(cdt)
    block = max(MIN_VOCAB, min(WEIGHT_BLOCK_BYTES, budget // 2) // max(hidden * elem, 1))
    block = int(min(block, vocab))
    rows = max(min(MIN_ROWS, max(n, 1)), budget // (block * elem * buffers))
    return block, int(min(rows, max(n, 1)))


def transient_bytes(n: int, vocab: int, hidden: int, cdt: torch.dtype, budget: int, softcap: bool,
                    need_e: bool = True, need_c: bool = True) -> int:
    """Bytes this path allocates besides its outputs: weight block + dC block accumulator, the logit tile(s),
    dE in fp32, per-row statistics."""
    elem, buffers = _elem(cdt), 2 if softcap else 1
    if n * vocab * elem * buffers <= budget:  # one tile: the whole problem in one pass
        tile = n * vocab * elem * buffers
        block = min(vocab, max(MIN_VOCAB, min(WEIGHT_BLOCK_BYTES, budget // 2) // max(hidden * elem, 1)))
    else:
        block, rows = plan(n, vocab, hidden, cdt, budget, buffers)
        tile = rows * block * elem * buffers
    weights = block * hidden * elem * (2 if need_c else 1)
    return tile + weights + (n * hidden * elem if need_e else 0) + n * 4 * elem


def _blocks(p: LCEProblem, block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(v0, v1, fp32 copy of c[v0:v1]) for each vocabulary block, one upcast at a time."""
    V = p.vocab
    for v0 in range(0, V, block):
        v1 = min(v0 + block, V)
        yield v0, v1, p.c[v0:v1].to(p.compute_dtype)


class _Rows:
    """The row chunks of the valid rows; with a single chunk its upcast/gathered hidden states are kept across
    vocabulary blocks (no repeated gather)."""

    def __init__(self, p: LCEProblem, rows: int):
        self.p, self.rows = p, rows
        self.starts = list(range(0, p.n, rows))
        self._only = _row_chunk(p, 0, rows, p.compute_dtype) if len(self.starts) == 1 else None

    def __iter__(self):
        for s in self.starts:
            e_b, where = self._only if self._only is not None else _row_chunk(self.p, s, self.rows,
                                                                               self.p.compute_dtype)
            yield s, e_b, where


def _tile(buf: torch.Tensor, tbuf: torch.Tensor | None, r: int, w: int):
    return buf[: r * w].view(r, w), (None if tbuf is None else tbuf[: r * w].view(r, w))


def _alloc(p: LCEProblem, size: int):
    buf = torch.empty(size, dtype=p.compute_dtype, device=p.e.device)
    tbuf = torch.empty(size, dtype=p.compute_dtype, device=p.e.device) if p.softcap is not None else None
    return buf, tbuf


def _bias(p: LCEProblem) -> torch.Tensor | None:
    return p.bias.to(p.compute_dtype) if p.bias is not None else None


# ---------------------------------------------------------------------------------------------------------------
# pass 1: log-sum-exp


def lse_and_target(p: LCEProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Per valid row: log-sum-exp over the vocabulary and the target logit, (n,) each, vocabulary-outer."""
    cdt, n, V, D = p.compute_dtype, p.n, p.vocab, p.e.shape[1]
    dev = p.e.device
    lse = torch.empty(n, dtype=cdt, device=dev)
    z = torch.empty(n, dtype=cdt, device=dev)
    if n == 0:
        return lse, z
    buffers = 2 if p.softcap is not None else 1
    block, rows = plan(n, V, D, cdt, p.budget, buffers)
    chunks = _Rows(p, rows)
    bias = _bias(p)
    for s, e_b, _ in chunks:
        r = e_b.shape[0]
        z[s:s + r] = _target_logits(e_b, p.c, p.y[s:s + r], bias, p.softcap, cdt)
    m = torch.full((n,), float("-inf"), dtype=cdt, device=dev)
    acc = torch.zeros(n, dtype=cdt, device=dev)
    online = {s: _OnlineStats(min(rows, n - s), dev, cdt) for s in chunks.starts} if p.stats is not None else None
    buf, tbuf = _alloc(p, rows * block)
    for v0, v1, c32 in _blocks(p, block):
        b_v = None if bias is None else bias[v0:v1]
        for s, e_b, _ in chunks:
            r = e_b.shape[0]
            out_buf, t = _tile(buf, tbuf, r, v1 - v0)
            out = _logits_into(out_buf, e_b, c32, b_v, p.softcap, t)
            m_old = m[s:s + r]
            m_new = torch.maximum(m_old, out.amax(1)) if online is None else online[s].see_max(m_old, out, v0)
            rescale = torch.exp(m_old - m_new)
            part = out.sub_(m_new[:, None]).exp_()
            if online is not None:
                online[s].see_scores(part, rescale, m_old - m_new, acc[s:s + r])
            acc[s:s + r] = acc[s:s + r] * rescale + part.sum(1)
            m[s:s + r] = m_new
    torch.add(m, acc.log(), out=lse)
    if online is not None:
        for s, st in online.items():
            r = st.top.shape[0]
            st.finish(p.stats, acc[s:s + r], p.y[s:s + r])
    return lse, z


# ---------------------------------------------------------------------------------------------------------------
# pass 2: gradients


class _Out:
    """dE (fp32, N x D), dC (c's dtype, written block by block), dbias (fp32)."""

    def __init__(self, p: LCEProblem, need_e: bool, need_c: bool, need_bias: bool):
        cdt, dev = p.compute_dtype, p.e.device
        self.de = torch.zeros(p.e.shape, dtype=cdt, device=dev) if need_e else None
        self.dc = torch.zeros(p.c.shape, dtype=p.c.dtype, device=dev) if need_c else None
        self.db = torch.zeros(p.vocab, dtype=cdt, device=dev) if need_bias and p.bias is not None else None

    def tile(self, g: torch.Tensor, cols: torch.Tensor | None, e_b: torch.Tensor, c32: torch.Tensor, v0: int,
             where, dc_blk: torch.Tensor | None) -> None:
        """Add one tile's logit gradient ``g`` (rows x block columns; ``cols`` = the kept columns or None)."""
        if cols is not None:
            g = g.index_select(1, cols)
            c32 = c32.index_select(0, cols)
        if self.de is not None:
            if isinstance(where, slice):
                self.de[where].addmm_(g, c32)
            else:
                self.de.index_add_(0, where, g @ c32)
        if dc_blk is not None:
            if cols is None:
                dc_blk.addmm_(g.t(), e_b)
            else:
                dc_blk.index_add_(0, cols, g.t() @ e_b)
        if self.db is not None:
            sums = g.sum(0)
            if cols is None:
                self.db[v0:v0 + sums.shape[0]] += sums
            else:
                self.db.index_add_(0, cols + v0, sums)

    def finish(self):
        return self.de, self.dc, self.db


def grads(p: LCEProblem, lse: torch.Tensor, row_scale: torch.Tensor, need_e: bool, need_c: bool,
          need_bias: bool, vocab_order: torch.Tensor | None = None):
    """dE (N, D) and dbias (V,) in the compute dtype, dC (V, D) in ``c``'s dtype (None where not needed),
    recomputing the logits block by block from the saved log-sum-exp. ``vocab_order`` is ignored."""
    cdt, n, V, D = p.compute_dtype, p.n, p.vocab, p.e.shape[1]
    out = _Out(p, need_e, need_c, need_bias)
    if n == 0:
        return out.finish()
    buffers = 2 if p.softcap is not None else 1
    block, rows = plan(n, V, D, cdt, p.budget, buffers)
    chunks = _Rows(p, rows)
    bias = _bias(p)
    row_scale = row_scale.to(cdt)
    buf, tbuf = _alloc(p, rows * block)
    for v0, v1, c32 in _blocks(p, block):
        w = v1 - v0
        dc_blk = torch.zeros(w, D, dtype=cdt, device=p.e.device) if out.dc is not None else None
        for s, e_b, where in chunks:
            r = e_b.shape[0]
            y_b, lse_b = p.y[s:s + r], lse[s:s + r]
            scale_b = row_scale[s:s + r] if row_scale.dim() == 1 else row_scale
            coef = 1.0 + 2.0 * p.z_loss * lse_b if p.z_loss else None
            out_buf, t = _tile(buf, tbuf, r, w)
            sc = _logits_into(out_buf, e_b, c32, None if bias is None else bias[v0:v1], p.softcap, t)
            sc.sub_(lse_b[:, None]).exp_()
            if w == V:
                cols = _score_to_grad(sc, t, coef, y_b, None, scale_b, p.filter_eps)
            else:
                rows_in = ((y_b >= v0) & (y_b < v1)).nonzero().squeeze(1)
                cols = _score_to_grad(sc, t, coef, y_b.index_select(0, rows_in) - v0, rows_in, scale_b,
                                      p.filter_eps)
            out.tile(sc, cols, e_b, c32, v0, where, dc_blk)
        if dc_blk is not None:
            out.dc[v0:v1].copy_(dc_blk)  # the one rounding of these dC rows
    return out.finish()


# ---------------------------------------------------------------------------------------------------------------
# the scalar-loss sweep


def fused(p: LCEProblem, scale: torch.Tensor, need_e: bool, need_c: bool, need_bias: bool):
    """Loss sum and gradients of ``scale · Σ_i loss_i``: one pass when a single tile holds the whole problem,
    else the log-sum-exp pass then the gradient pass. Returns (loss_sum, lse, dE, dC, dbias)."""
    cdt, n, V = p.compute_dtype, p.n, p.vocab
    buffers = 2 if p.softcap is not None else 1
    if n and n * V * _elem(cdt) * buffers <= p.budget:
        return _single_tile(p, scale, need_e, need_c, need_bias)
    lse, z = lse_and_target(p)
    loss_sum = _row_losses(lse, z, p.z_loss).sum() if n else torch.zeros((), dtype=cdt, device=p.e.device)
    return (loss_sum, lse) + grads(p, lse, scale, need_e, need_c, need_bias)


def _single_tile(p: LCEProblem, scale: torch.Tensor, need_e: bool, need_c: bool, need_bias: bool):
    """Every valid row and the whole vocabulary in one (n, V) tile: logits once (written block by block from
    the upcast weight blocks), softmax and gradient in place, then dE / dC block by block."""
    cdt, n, V, D = p.compute_dtype, p.n, p.vocab, p.e.shape[1]
    block = plan(n, V, D, cdt, p.budget, 2 if p.softcap is not None else 1)[0]
    buf, tbuf = _alloc(p, n * V)
    sc, t = _tile(buf, tbuf, n, V)
    e_b, where = _row_chunk(p, 0, n, cdt)
    bias = _bias(p)
    for v0, v1, c32 in _blocks(p, block):
        _logits_into(sc[:, v0:v1], e_b, c32, None if bias is None else bias[v0:v1], p.softcap,
                     None if t is None else t[:, v0:v1])
    y = p.y
    z = sc.gather(1, y[:, None]).squeeze(1)
    m, top = sc.max(1) if p.stats is not None else (sc.amax(1), None)
    total = sc.sub_(m[:, None]).exp_().sum(1)
    lse = m + total.log()
    if top is not None:
        p.stats.add(_entropy(sc, total), top == y)
    loss_sum = _row_losses(lse, z, p.z_loss).sum()
    coef = 1.0 / total if not p.z_loss else (1.0 + 2.0 * p.z_loss * lse) / total
    cols = _score_to_grad(sc, t, coef, y, None, scale.to(cdt), p.filter_eps)
    out = _Out(p, need_e, need_c, need_bias)
    for v0, v1, c32 in _blocks(p, block):
        g = sc[:, v0:v1]
        local = None
        if cols is not None:
            local = cols[(cols >= v0) & (cols < v1)] - v0
            if local.numel() == 0:
                continue
        dc_blk = torch.zeros(v1 - v0, D, dtype=cdt, device=p.e.device) if out.dc is not None else None
        out.tile(g, local, e_b, c32, v0, where, dc_blk)
        if dc_blk is not None:
            out.dc[v0:v1].copy_(dc_blk)
    return (loss_sum, lse) + out.finish()

