"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto
the columns not yet quantized through the inverse Hessian of the layer's inputs.

``H = (2/N) Σ x xᵀ`` over the calibration tokens (:class:`HessianAccumulator`). With ``Hinv`` the upper Cholesky
factor of ``(H + λI)⁻¹``, column ``j`` is rounded to its group's grid, its error ``e = (w_j − q_j) / Hinv[j, j]``
is subtracted from the remaining columns of the block (``W[:, j+1:] −= e ⊗ Hinv[j, j+1:]``), and after each
block of columns the accumulated errors update everything to the right at once (the "lazy batch" update, one
matmul instead of one rank-1 update per column).

Options: ``act_order`` visits columns by decreasing ``diag(H)`` (most activated first); ``static_groups`` fits
every group's grid up front on the unmodified weight (needed with ``act_order`` so that the groups stay
contiguous in the stored layout: compressed-tensors has no ``g_idx``). Without static groups, a group's grid is
fitted when the pass reaches its first column, on the already error-updated values; the block size is rounded to
a multiple of the group size so that those values are all current.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import IncompatibleModelError
from ...compress.grid import QuantizedWeight, QuantSpec, fit_group_params, fit_params, store_params
from ..threads import single_thread

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger("hf_memkit")


class HessianAccumulator:
    """Running ``H = (2/N) Σ x xᵀ`` (fp32) over every token a Linear layer sees."""

    def __init__(self, columns: int, device: "torch.device | str" = "cpu"):
        import torch

        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: "torch.Tensor") -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        tokens = x.shape[0]
        if tokens == 0:
            return
        self.H *= self.nsamples / (self.nsamples + tokens)
        self.nsamples += tokens
        x = math.sqrt(2 / self.nsamples) * x
        self.H.addmm_(x.T, x)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    #: Σ over columns of ((w − q)² / Hinv[j,j]²) / 2: the second-order estimate of the added output error
    loss: float
    damp: float


def _inverse_cholesky(H: "torch.Tensor", damp: float, key: str) -> tuple["torch.Tensor", float]:
    import torch

    mean_diag = torch.mean(torch.diag(H)).item()
    for attempt in range(4):
        lam = damp * (10**attempt) * mean_diag
        Hd = H.clone()
        Hd.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            if attempt:
                logger.warning("hf_memkit: %s: the Hessian needed %.0fx the damping to be positive definite", key,
                               10**attempt)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True), damp * 10**attempt
    raise IncompatibleModelError(
        f"{key}: the calibration Hessian is not positive definite even with damp={damp * 1000}; the layer's inputs "
        "are degenerate (too few calibration tokens?). Use more calibration samples or raise damp"
    )


def gptq_quantize(W: "torch.Tensor", H: "torch.Tensor", spec: QuantSpec, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, static_groups: bool = False, mse: bool = False,
                  dtype: "torch.dtype | None" = None, key: str = "gptq") -> GPTQResult:
    """Quantize ``W [out, in]`` given the Hessian ``H [in, in]`` of its inputs. Scales are stored in ``dtype``
    (default: W's dtype). Returns the codes on the grid and GPTQ's own error estimate."""
    with single_thread(W):
        return _gptq(W, H, spec, block_size, damp, act_order, static_groups, mse, dtype, key)


def _gptq(W, H, spec, block_size, damp, act_order, static_groups, mse, dtype, key) -> GPTQResult:
    import torch

    dtype = dtype or W.dtype
    W = W.detach().float().clone()
    out, cols = W.shape
    spec = spec.for_width(cols)
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    width = spec.group_width(cols)
    grouped = width < cols
    if act_order and grouped and not static_groups:
        raise IncompatibleModelError(f"{key}: act_order with groups needs static_groups (no g_idx in the export)")
    fixed_grid = static_groups or not grouped
    if fixed_grid:
        scale, zero = fit_group_params(W, spec, mse=mse, dtype=dtype)
    else:
        scale = torch.empty(out, cols // width, dtype=dtype, device=W.device)
        zero = torch.empty(out, cols // width, dtype=torch.uint8, device=W.device)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv, used_damp = _inverse_cholesky(H, damp, key)

    block = block_size
    if grouped:  # each group inside one block, so its grid is fitted on up-to-date values
        block = width * max(1, round(block_size / width)) if width <= block_size else width
    codes = torch.zeros(out, cols, dtype=torch.uint8, device=W.device)
    maxq = spec.maxq
    loss = 0.0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not fixed_grid and j % width == 0:
                s, z = fit_params(W1[:, i:i + width], spec, mse=mse)
                s, z = store_params(s, z, dtype)
                scale[:, j // width], zero[:, j // width] = s, z
            col = int(perm[j]) if perm is not None else j
            g = (col if fixed_grid else j) // width
            s = scale[:, g].float()
            z = zero[:, g].float()
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            codes[:, j] = q.to(torch.uint8)
            err = (w - s * (q - z)) / d
            loss += float((err * err).sum()) / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return GPTQResult(QuantizedWeight(codes, scale, zero, spec), loss, used_damp)
