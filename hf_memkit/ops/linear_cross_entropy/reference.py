"""Linear cross-entropy in plain PyTorch, on any device, without an N×V tensor.

Rows (tokens) are processed in chunks; when a chunk of rows cannot hold all V logits within the memory budget the
vocabulary is chunked too and the log-sum-exp is merged online (running max and rescaled sum). The backward pass
recomputes the logits chunk by chunk from the saved log-sum-exp. For a scalar loss ``fused`` does forward and
backward in a single sweep (each logit chunk is computed once and immediately turned into its gradient).

Chunk sizes come from a memory budget in bytes (:func:`plan_chunks`), never from a constant. All accumulation
is in fp32 (fp64 for fp64 inputs); 16-bit hidden states are upcast chunk by chunk, and a 16-bit classifier
goes to :mod:`.blocked` (upcast block by block, dC rounded block by block: no V×D fp32 tensor).

Also here: :func:`naive_linear_cross_entropy`, the materialised path (``F.cross_entropy`` on ``e @ c.T``), the
yardstick of the tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .problem import LCEProblem

#: below these a chunk's matmul stops being efficient; the planner chunks the vocabulary before going lower
MIN_ROWS = 16
MIN_VOCAB = 16
#: column filtering pays only when it drops at least this share of a chunk's columns
FILTER_MIN_DROP = 0.5


# ---------------------------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class ChunkPlan:
    rows: int
    vocab: int
    buffers: int

    def single_pass(self, vocab: int) -> bool:
        return self.vocab >= vocab


def plan_chunks(n_rows: int, vocab: int, compute_dtype: torch.dtype, budget: int, buffers: int) -> ChunkPlan:
    """Rows and vocabulary entries per chunk so that ``buffers`` logit-sized chunk buffers fit in ``budget``
    bytes. Full-vocabulary chunks (no recomputation) are preferred while they leave at least MIN_ROWS rows."""
    elem = torch.finfo(compute_dtype).bits // 8
    per_row = vocab * elem * buffers
    n_rows = max(n_rows, 1)
    rows = budget // per_row
    if rows >= min(MIN_ROWS, n_rows):
        return ChunkPlan(int(min(rows, n_rows)), vocab, buffers)
    rows = min(n_rows, MIN_ROWS)
    v = max(MIN_VOCAB, budget // (rows * elem * buffers))
    return ChunkPlan(int(rows), int(min(v, vocab)), buffers)


def chunk_bytes(n_rows: int, vocab: int, compute_dtype: torch.dtype, budget: int, softcap: bool) -> int:
    """The chunk memory the torch path will allocate (for memory estimates)."""
    plan = plan_chunks(n_rows, vocab, compute_dtype, budget, 2 if softcap else 1)
    return plan.rows * plan.vocab * (torch.finfo(compute_dtype).bits // 8) * plan.buffers


# ---------------------------------------------------------------------------------------------------------------
# chunk helpers


def _buffers(plan: ChunkPlan, p: LCEProblem):
    """Flat chunk buffers, allocated once per call and viewed per chunk (every view is contiguous, so matmuls
    write into them directly)."""
    size = plan.rows * plan.vocab
    buf = torch.empty(size, dtype=p.compute_dtype, device=p.e.device)
    tbuf = torch.empty(size, dtype=p.compute_dtype, device=p.e.device) if p.softcap is not None else None
    return buf, tbuf


def _view(flat: torch.Tensor | None, r: int, w: int) -> torch.Tensor | None:
    return None if flat is None else flat[: r * w].view(r, w)


def _row_chunk(p: LCEProblem, s: int, r: int, cdt: torch.dtype):
    """The hidden states of valid rows [s, s+r) in the compute dtype, and where their gradients go."""
    if p.rows is None:
        return p.e[s:s + r].to(cdt), slice(s, s + r)
    idx = p.rows[s:s + r]
    return p.e.index_select(0, idx).to(cdt), idx


def _logits_into(out: torch.Tensor, e_b: torch.Tensor, c_v: torch.Tensor, b_v: torch.Tensor | None,
                 softcap: float | None, t_out: torch.Tensor | None):
    """Logits of one chunk written into ``out`` (after bias and softcap). With softcap, ``t_out`` receives
    tanh(a / cap), kept for the chain rule, and ``out`` the capped logits."""
    target = t_out if softcap is not None else out
    if b_v is None:
        torch.mm(e_b, c_v.t(), out=target)
    else:
        torch.addmm(b_v, e_b, c_v.t(), out=target)
    if softcap is not None:
        target.div_(softcap).tanh_()
        torch.mul(target, softcap, out=out)
    return out


def _target_logits(e_b: torch.Tensor, c: torch.Tensor, y_b: torch.Tensor, bias: torch.Tensor | None,
                   softcap: float | None, cdt: torch.dtype) -> torch.Tensor:
    """z_i = e_i · c_{y_i} (+ b, softcap): an O(rows·D) gather, never a row of logits."""
    z = (e_b * c.index_select(0, y_b).to(cdt)).sum(1)
    if bias is not None:
        z = z + bias.index_select(0, y_b).to(cdt)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def _keep_columns(s: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Columns of a chunk's score matrix that hold an entry of magnitude >= eps, when dropping the others is
    worth a gather; None means use the chunk dense."""
    keep = (s.amax(0) >= eps) | (s.amin(0) <= -eps)
    kept = int(keep.sum())
    if kept > (1 - FILTER_MIN_DROP) * s.shape[1]:
        return None
    return keep.nonzero().squeeze(1)


class _GradSink:
    """Accumulators for dE, dC and dbias in the compute dtype (the caller casts them to the input dtypes)."""

    def __init__(self, p: LCEProblem, need_e: bool, need_c: bool, need_bias: bool):
        cdt = p.compute_dtype
        self.de = torch.zeros(p.e.shape, dtype=cdt, device=p.e.device) if need_e else None
        # dC is written, not accumulated, by the first full-vocabulary chunk: no zero-fill pass over V×D
        self.dc = torch.empty(p.c.shape, dtype=cdt, device=p.c.device) if need_c else None
        self._dc_blank = need_c
        self.db = torch.zeros(p.vocab, dtype=cdt, device=p.c.device) if need_bias and p.bias is not None else None

    def finish(self):
        if self._dc_blank:  # no chunk reached dC (no valid rows)
            self.dc.zero_()
            self._dc_blank = False
        return self.de, self.dc, self.db

    def add(self, g: torch.Tensor, e_b: torch.Tensor, c_v: torch.Tensor, v0: int, de_b: torch.Tensor | None,
            cols: torch.Tensor | None) -> None:
        """Add the contribution of one chunk's logit gradient ``g`` (rows × chunk vocab)."""
        if cols is not None:
            g = g.index_select(1, cols)
            c_v = c_v.index_select(0, cols)
        if de_b is not None:
            de_b.addmm_(g, c_v)
        if self.dc is not None:
            if self._dc_blank and cols is None and g.shape[1] == self.dc.shape[0]:
                torch.mm(g.t(), e_b, out=self.dc)
            elif cols is None:
                self._zero_dc()
                self.dc[v0:v0 + g.shape[1]].addmm_(g.t(), e_b)
            else:
                self._zero_dc()
                self.dc.index_add_(0, cols + v0, g.t() @ e_b)
            self._dc_blank = False
        if self.db is not None:
            if cols is None:
                self.db[v0:v0 + g.shape[1]] += g.sum(0)
            else:
                self.db.index_add_(0, cols + v0, g.sum(0))

    def _zero_dc(self) -> None:
        if self._dc_blank:
            self.dc.zero_()
            self._dc_blank = False

    def put_rows(self, where, de_b: torch.Tensor) -> None:
        if self.de is None:
            return
        if isinstance(where, slice):
            self.de[where] += de_b
        else:
            self.de.index_add_(0, where, de_b)


def _score_to_grad(s: torch.Tensor, t: torch.Tensor | None, coef: torch.Tensor | None, y_local: torch.Tensor,
                   rows_in: torch.Tensor | None, row_scale: torch.Tensor, eps: float | None) -> torch.Tensor | None:
    """Turn ``s`` = exp(logit - shift) in place into the logit gradient
    ``row_scale · (s·coef − onehot(y)) · (1 − tanh²)``, where ``coef`` (per row) normalises the softmax and
    carries the z-loss factor (None: 1). Only the targets that fall in this chunk are subtracted (``rows_in``:
    their rows; None: every row). With filtering, the columns whose entries of ``s·coef − onehot`` all stay below
    eps are dropped: the kept columns are returned (None = all)."""
    cols = None
    if eps is None:  # fold the upstream scale into the normalisation: one pass over the chunk instead of two
        scale = row_scale if row_scale.dim() == 1 else row_scale.expand(s.shape[0])
        s.mul_((scale if coef is None else coef * scale)[:, None])
        hit = -scale if rows_in is None else -scale.index_select(0, rows_in)
    else:
        if coef is not None:
            s.mul_(coef[:, None])
        hit = torch.full_like(y_local, -1.0, dtype=s.dtype)
    if rows_in is None:
        s.scatter_add_(1, y_local[:, None], hit[:, None].to(s.dtype))
    else:
        s.index_put_((rows_in, y_local), hit.to(s.dtype), accumulate=True)
    if eps is not None:
        cols = _keep_columns(s, eps)
        s.mul_(row_scale[:, None] if row_scale.dim() == 1 else row_scale)
    if t is not None:
        s.mul_(t.square_().neg_().add_(1.0))
    return cols


# ---------------------------------------------------------------------------------------------------------------
# the three entry points of the torch backend


def _blocked(p: LCEProblem) -> bool:
    """A 16-bit classifier goes to :mod:`.blocked` (block-wise upcast, no fp32 copy of ``c``, no fp32 (V, D) dC
    accumulator)."""
    return p.c.element_size() < torch.finfo(p.compute_dtype).bits // 8


def lse_and_target(p: LCEProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Per valid row: log-sum-exp over the vocabulary and the target logit, both (n,) in the compute dtype."""
    if _blocked(p):
        from . import blocked

        return blocked.lse_and_target(p)
    cdt, n, V = p.compute_dtype, p.n, p.vocab
    lse = torch.empty(n, dtype=cdt, device=p.e.device)
    z = torch.empty(n, dtype=cdt, device=p.e.device)
    if n == 0:
        return lse, z
    plan = plan_chunks(n, V, cdt, p.budget, 2 if p.softcap is not None else 1)
    buf, tbuf = _buffers(plan, p)
    bias = p.bias.to(cdt) if p.bias is not None else None
    for s in range(0, n, plan.rows):
        e_b, _ = _row_chunk(p, s, plan.rows, cdt)
        r = e_b.shape[0]
        z[s:s + r] = _target_logits(e_b, p.c, p.y[s:s + r], bias, p.softcap, cdt)
        m = torch.full((r,), float("-inf"), dtype=cdt, device=p.e.device)
        acc = torch.zeros(r, dtype=cdt, device=p.e.device)
        online = _OnlineStats(r, p.e.device, cdt) if p.stats is not None else None
        for v0 in range(0, V, plan.vocab):
            v1 = min(v0 + plan.vocab, V)
            out = _logits_into(_view(buf, r, v1 - v0), e_b, p.c[v0:v1].to(cdt),
                               None if bias is None else bias[v0:v1], p.softcap, _view(tbuf, r, v1 - v0))
            if online is None:
                m_new = torch.maximum(m, out.amax(1))
            else:
                m_new = online.see_max(m, out, v0)
            rescale = torch.exp(m - m_new)
            part = out.sub_(m_new[:, None]).exp_()
            if online is not None:
                online.see_scores(part, rescale, m - m_new, acc)
            acc.mul_(rescale).add_(part.sum(1))
            m = m_new
        lse[s:s + r] = m + acc.log()
        if online is not None:
            online.finish(p.stats, acc, p.y[s:s + r])
    return lse, z


def grads(p: LCEProblem, lse: torch.Tensor, row_scale: torch.Tensor, need_e: bool, need_c: bool,
          need_bias: bool, vocab_order: torch.Tensor | None = None):
    """dE (N, D), dC (V, D), dbias (V,) in the compute dtype (None where not needed), recomputing the logits
    chunk by chunk from the saved log-sum-exp. ``row_scale`` is the upstream gradient: (n,) per row or a scalar.
    ``vocab_order`` is ignored: the torch path filters per column, where the order of the vocabulary does not
    matter."""
    if _blocked(p):
        from . import blocked

        return blocked.grads(p, lse, row_scale, need_e, need_c, need_bias)
    cdt, n, V = p.compute_dtype, p.n, p.vocab
    sink = _GradSink(p, need_e, need_c, need_bias)
    if n == 0:
        return sink.finish()
    plan = plan_chunks(n, V, cdt, p.budget, 2 if p.softcap is not None else 1)
    buf, tbuf = _buffers(plan, p)
    bias = p.bias.to(cdt) if p.bias is not None else None
    row_scale = row_scale.to(cdt)
    for s in range(0, n, plan.rows):
        e_b, where = _row_chunk(p, s, plan.rows, cdt)
        r = e_b.shape[0]
        y_b, lse_b = p.y[s:s + r], lse[s:s + r]
        scale_b = row_scale[s:s + r] if row_scale.dim() == 1 else row_scale
        coef = 1.0 + 2.0 * p.z_loss * lse_b if p.z_loss else None
        de_b = torch.zeros(r, p.e.shape[1], dtype=cdt, device=p.e.device) if need_e else None
        for v0 in range(0, V, plan.vocab):
            v1 = min(v0 + plan.vocab, V)
            c_v = p.c[v0:v1].to(cdt)
            t = _view(tbuf, r, v1 - v0)
            sc = _logits_into(_view(buf, r, v1 - v0), e_b, c_v, None if bias is None else bias[v0:v1], p.softcap, t)
            sc.sub_(lse_b[:, None]).exp_()
            if v1 - v0 == V:
                cols = _score_to_grad(sc, t, coef, y_b, None, scale_b, p.filter_eps)
            else:
                rows_in = ((y_b >= v0) & (y_b < v1)).nonzero().squeeze(1)
                cols = _score_to_grad(sc, t, coef, y_b[rows_in] - v0, rows_in, scale_b, p.filter_eps)
            sink.add(sc, e_b, c_v, v0, de_b, cols)
        if de_b is not None:
            sink.put_rows(where, de_b)
    return sink.finish()


def fused(p: LCEProblem, scale: torch.Tensor, need_e: bool, need_c: bool, need_bias: bool):
    """Loss sum and gradients of ``scale · Σ_i loss_i`` in one sweep (the scalar-loss fast path).

    When a chunk of rows can hold the whole vocabulary, each logit chunk is computed once: log-sum-exp, then
    softmax and gradient in place — three matmuls in all, as many as the materialised path. Otherwise the
    log-sum-exp is found first (online over vocabulary chunks) and the gradients recomputed.
    Returns (loss_sum, lse, dE, dC, dbias)."""
    if _blocked(p):
        from . import blocked

        return blocked.fused(p, scale, need_e, need_c, need_bias)
    cdt, n, V = p.compute_dtype, p.n, p.vocab
    plan = plan_chunks(n, V, cdt, p.budget, 2 if p.softcap is not None else 1)
    if n and not plan.single_pass(V):
        lse, z = lse_and_target(p)
        loss_sum = _row_losses(lse, z, p.z_loss).sum()
        return (loss_sum, lse) + grads(p, lse, scale, need_e, need_c, need_bias)
    sink = _GradSink(p, need_e, need_c, need_bias)
    lse = torch.empty(n, dtype=cdt, device=p.e.device)
    loss_sum = torch.zeros((), dtype=cdt, device=p.e.device)
    if n == 0:
        return (loss_sum, lse) + sink.finish()
    buf, tbuf = _buffers(plan, p)
    bias = p.bias.to(cdt) if p.bias is not None else None
    c = p.c.to(cdt)
    scale = scale.to(cdt)
    for s in range(0, n, plan.rows):
        e_b, where = _row_chunk(p, s, plan.rows, cdt)
        r = e_b.shape[0]
        y_b = p.y[s:s + r]
        t = _view(tbuf, r, V)
        sc = _logits_into(_view(buf, r, V), e_b, c, bias, p.softcap, t)
        z = sc.gather(1, y_b[:, None]).squeeze(1)
        m, top = sc.max(1) if p.stats is not None else (sc.amax(1), None)
        total = sc.sub_(m[:, None]).exp_().sum(1)
        lse_b = m + total.log()
        if top is not None:  # before the scores turn into gradients in place
            p.stats.add(_entropy(sc, total), top == y_b)
        lse[s:s + r] = lse_b
        loss_sum += _row_losses(lse_b, z, p.z_loss).sum()
        coef = 1.0 / total if not p.z_loss else (1.0 + 2.0 * p.z_loss * lse_b) / total
        cols = _score_to_grad(sc, t, coef, y_b, None, scale, p.filter_eps)
        if need_e and cols is None and isinstance(where, slice) and sink.de is not None:
            torch.mm(sc, c, out=sink.de[where])  # rows are disjoint: write, do not accumulate
            sink.add(sc, e_b, c, 0, None, None)
            continue
        de_b = torch.zeros(r, p.e.shape[1], dtype=cdt, device=p.e.device) if need_e else None
        sink.add(sc, e_b, c, 0, de_b, cols)
        if de_b is not None:
            sink.put_rows(where, de_b)
    return (loss_sum, lse) + sink.finish()


# ---------------------------------------------------------------------------------------------------------------
# token statistics (entropy, argmax accuracy) for hosts that log them, e.g. TRL's SFTTrainer


def _entropy(s: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Softmax entropy per row from ``s`` = exp(logit − rowmax) and its row sum: H = log Σs − Σ s·log s / Σs.
    Written relative to the row max, so no large logit cancels (xlogy(0, 0) = 0 for underflowed entries)."""
    return total.log() - torch.special.xlogy(s, s).sum(1) / total


class _OnlineStats:
    """Entropy and argmax over vocabulary chunks, merged online like the log-sum-exp: ``t`` = Σ_j s_j·(l_j − m)
    with s_j = exp(l_j − m) relative to the running max m, so H = log(acc) − t / acc at the end; the argmax keeps
    the first maximum (a later chunk wins only when strictly larger), as ``torch.argmax`` does."""

    def __init__(self, r: int, device: torch.device, cdt: torch.dtype):
        self.t = torch.zeros(r, dtype=cdt, device=device)
        self.top = torch.zeros(r, dtype=torch.long, device=device)
        self.first = True

    def see_max(self, m: torch.Tensor, out: torch.Tensor, v0: int) -> torch.Tensor:
        cmax, cidx = out.max(1)
        self.top = torch.where(cmax > m, cidx + v0, self.top)
        return torch.maximum(m, cmax)

    def see_scores(self, part: torch.Tensor, rescale: torch.Tensor, shift: torch.Tensor, acc: torch.Tensor) -> None:
        """``part`` = exp(l − m_new) of this chunk, ``shift`` = m_old − m_new (−inf on the first chunk, where
        ``acc`` and ``t`` are still 0)."""
        here = torch.special.xlogy(part, part).sum(1)
        if self.first:
            self.t = here
            self.first = False
        else:
            self.t = rescale * (self.t + shift * acc) + here

    def finish(self, stats, acc: torch.Tensor, y: torch.Tensor) -> None:
        stats.add(acc.log() - self.t / acc, self.top == y)


def token_stats(p: LCEProblem) -> None:
    """Fill ``p.stats`` with a forward-only chunked pass (for backends that do not compute them themselves: the
    Triton kernels keep their numerics and cost, and the statistics cost one more pass over the logits)."""
    if p.stats is None:
        return
    with torch.no_grad():
        lse_and_target(p)
    p.stats.zero(p.e.device)


def _row_losses(lse: torch.Tensor, z: torch.Tensor, z_loss: float) -> torch.Tensor:
    out = lse - z
    if z_loss:
        out = out + z_loss * lse.square()
    return out


# ---------------------------------------------------------------------------------------------------------------
# the materialised yardstick


def shift_targets(targets: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """targets[..., t + shift] at position t, ``ignore_index`` for the last ``shift`` positions (an O(N) copy of
    the integer targets; the hidden states are not touched)."""
    if not shift:
        return targets
    out = torch.full_like(targets, ignore_index)
    if shift < targets.shape[-1]:
        out[..., :-shift] = targets[..., shift:]
    return out


def naive_linear_cross_entropy(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               softcap: float | None = None, reduction: str = "mean", shift: int | bool = False,
                               z_loss: float = 0.0, num_items_in_batch=None) -> torch.Tensor:
    """The materialised path, as a Hugging Face model computes it: logits = e @ c.T (+bias, softcap) in the input
    dtype, upcast to fp32, ``F.cross_entropy``. Same signature and semantics as ``linear_cross_entropy``."""
    logits = e @ c.t()
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float() if logits.dtype != torch.float64 else logits
    tgt = shift_targets(targets, int(shift), ignore_index)
    flat_logits, flat_t = logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)
    if not z_loss and reduction != "none":
        if num_items_in_batch is not None:
            return F.cross_entropy(flat_logits, flat_t, ignore_index=ignore_index, reduction="sum") / num_items_in_batch
        return F.cross_entropy(flat_logits, flat_t, ignore_index=ignore_index, reduction=reduction)
    loss = F.cross_entropy(flat_logits, flat_t, ignore_index=ignore_index, reduction="none")
    if z_loss:
        valid = (flat_t != ignore_index).to(loss.dtype)
        loss = loss + z_loss * torch.logsumexp(flat_logits, -1).square() * valid
    if reduction == "none":
        return loss.view(tgt.shape)
    if reduction == "sum":
        return loss.sum()
    if num_items_in_batch is not None:
        return loss.sum() / num_items_in_batch
    return loss.sum() / (flat_t != ignore_index).sum()
