"""LoRC (ZeroQuant-V2, Yao et al. 2023, §5): a rank-``m`` correction of the quantization error.

``E = W − Ŵ`` (fp64), truncated SVD ``E ≈ U_m Σ_m V_mᵀ``, split symmetrically ``A = U_m Σ_m^{1/2}``
(``[out, m]``) and ``B = Σ_m^{1/2} V_mᵀ`` (``[m, in]``); inference computes ``Ŵx + A(Bx)``. The factors may
themselves be rounded to a per-row symmetric ``factor_bits`` grid. This module is the math only, shared by the
post-training pass here and the trainable PEFT adapter built on it later: it takes tensors and returns tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...compress.grid import QuantSpec, dequantize, rtn_quantize
from ..threads import single_thread

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class LoRCFactors:
    A: "torch.Tensor"  # [out, rank]
    B: "torch.Tensor"  # [rank, in]
    #: singular values of E (all of them, descending), for reports and rank choices
    singular_values: "torch.Tensor"

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])


def quantize_factor(t: "torch.Tensor", bits: int) -> "torch.Tensor":
    """Round each row of ``t`` to a symmetric ``bits`` grid (per-row scale) and return the dequantized values."""
    import torch

    qw = rtn_quantize(t.float(), QuantSpec(bits, None, True), dtype=torch.float32)
    return dequantize(qw.codes, qw.scale, qw.zero)


def lorc_factors(W: "torch.Tensor", W_hat: "torch.Tensor", rank: int, *, factor_bits: int | None = None,
                 dtype: "torch.dtype | None" = None) -> LoRCFactors:
    """Factors ``A, B`` with ``AB`` the best rank-``rank`` approximation of ``W − W_hat`` (Eckart–Young), in
    ``dtype`` (default W's). ``rank`` is capped at ``min(out, in)``. ``factor_bits`` rounds every row of A and
    of B to a symmetric grid: each factor keeps one scale per output of its own matmul (per output channel)."""
    import torch

    dtype = dtype or W.dtype
    E = W.detach().double() - W_hat.detach().double()
    with single_thread(E):
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    r = max(0, min(rank, S.shape[0]))
    root = S[:r].sqrt()
    A = U[:, :r] * root
    B = root[:, None] * Vh[:r]
    if factor_bits is not None and r:
        A = quantize_factor(A, factor_bits).double()
        B = quantize_factor(B, factor_bits).double()
    return LoRCFactors(A.to(dtype).contiguous(), B.to(dtype).contiguous(), S)
