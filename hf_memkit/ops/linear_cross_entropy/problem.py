"""What both backends (reference.py, triton.py) receive: the valid rows of one linear-cross-entropy problem,
plus the knobs shared by every implementation (filtering threshold, memory budget, error type)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...errors import MemkitError

MiB = 2**20


class LinearCrossEntropyError(MemkitError, ValueError):
    """Invalid arguments to :func:`~hf_memkit.ops.linear_cross_entropy.linear_cross_entropy`, or an
    implementation that cannot run here. The message names the argument and the fix."""


@dataclass
class LCEProblem:
    """``e`` is (N, D) — every position, ignored ones included, so that no copy of the hidden states is made;
    ``rows`` (n,) are the positions whose (shifted) target is not ignored (``None``: all N of them, in order)
    and ``y`` (n,) their targets. ``compute_dtype`` is the accumulation dtype (fp32, or fp64 for fp64 inputs)."""

    e: torch.Tensor
    c: torch.Tensor
    bias: torch.Tensor | None
    rows: torch.Tensor | None
    y: torch.Tensor
    softcap: float | None
    z_loss: float
    filter_eps: float | None
    budget: int
    compute_dtype: torch.dtype
    vocab_sort: bool = True
    #: filled by the torch backend's forward passes when set (see :class:`TokenStats`)
    stats: "TokenStats | None" = None

    @property
    def n(self) -> int:
        return self.y.numel()

    @property
    def vocab(self) -> int:
        return self.c.shape[0]


class TokenStats:
    """Token-level metrics of the logits a :func:`linear_cross_entropy` call saw, summed over its non-ignored
    targets: ``entropy_sum`` (Σ of each row's softmax entropy, nats), ``correct`` (rows whose target is the argmax,
    the first maximum on ties, as ``torch.argmax``) and ``count`` (non-ignored rows). 0-dim tensors on the inputs'
    device, no gradient; computed inside the chunked pass (no N×V tensor). Pass one as ``token_stats=`` and read it
    after the call; several calls add up."""

    def __init__(self) -> None:
        self.entropy_sum: torch.Tensor | None = None
        self.correct: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def add(self, entropy_rows: torch.Tensor, correct_rows: torch.Tensor) -> None:
        """Add one chunk of rows: per-row entropies and per-row argmax == target flags."""
        ent = entropy_rows.detach().sum()
        hit = correct_rows.detach().sum().to(torch.int64)
        cnt = torch.tensor(entropy_rows.numel(), dtype=torch.int64, device=ent.device)
        if self.entropy_sum is None:
            self.entropy_sum, self.correct, self.count = ent, hit, cnt
        else:
            self.entropy_sum, self.correct, self.count = self.entropy_sum + ent, self.correct + hit, self.count + cnt

    def zero(self, device: torch.device) -> None:
        """A call without non-ignored targets still leaves defined (zero) sums."""
        if self.entropy_sum is None:
            self.entropy_sum = torch.zeros((), dtype=torch.float32, device=device)
            self.correct = torch.zeros((), dtype=torch.int64, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)

    def mean_entropy(self) -> float:
        n = int(self.count) if self.count is not None else 0
        return float(self.entropy_sum) / n if n else 0.0

    def accuracy(self) -> float:
        n = int(self.count) if self.count is not None else 0
        return float(self.correct) / n if n else 0.0

    def __repr__(self) -> str:
        return f"TokenStats(count={self.count}, mean_entropy={self.mean_entropy():.4f}, accuracy={self.accuracy():.4f})"


def compute_dtype_of(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 accumulation for 16- and 32-bit inputs; fp64 only when every input is fp64."""
    return torch.float64 if all(d == torch.float64 for d in dtypes) else torch.float32


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    """``"auto"``: finfo(dtype).eps / 32 for 16-bit inputs (2^-12 for bf16, 2^-15 for fp16), the level below
    which a gradient entry vanishes when added to an O(1) value in that dtype. fp32/fp64 inputs are not filtered:
    there the saving is small and the result stays exact."""
    if filter_eps is None:
        return None
    if filter_eps == "auto":
        if dtype in (torch.bfloat16, torch.float16):
            return torch.finfo(dtype).eps / 32
        return None
    eps = float(filter_eps)
    return eps if eps > 0 else None


def default_budget(device: torch.device, vocab: int, hidden: int) -> int:
    """Bytes the chunked torch path may spend on one chunk of logits when no budget is given: half of the fp32
    classifier gradient, V·D·4/2. The chunk then adds at most half of what the loss's own unavoidable gradient
    buffer dC costs, and holds D/2 rows: each chunk streams C twice and dC once (O(V·D) bytes) against O(rows·V·D)
    of matmul work, so rows ∝ D keeps that streaming a small, fixed share of the time for every V and D.
    Clamped to [16 MiB, 1/64 of host RAM] on CPU and [64 MiB, 1/16 of device memory] on an accelerator."""
    want = vocab * hidden * 4 // 2
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(min(max(want, 64 * MiB), total // 16))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        total = 8 * 2**30
    return int(min(max(want, 16 * MiB), total // 64))
