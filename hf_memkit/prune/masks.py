"""N:M masks along the input dimension, with exact and deterministic tie-breaking.

A weight ``W [out, in]`` is cut into groups of ``m`` consecutive input columns of one output row; in each group the
``n`` entries with the largest score are kept. Ties are broken towards the lower column index (a stable sort of
the negated scores), so the mask keeps exactly ``n`` of every ``m`` whatever the values (true zeros included) and
is the same on every device and run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import IncompatibleModelError, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the N:M patterns hardware runs and compressed-tensors stores (sparse tensor cores, sparse-24-bitmask)
SUPPORTED_NM = ((2, 4),)


def check_nm(n: int, m: int, key: str = "prune") -> None:
    """Reject an N:M pattern other than the supported ones (typed, names the fix)."""
    if (n, m) not in SUPPORTED_NM:
        raise RecipeError(
            f"{n}:{m} sparsity is not supported; only 2:4 runs on sparse tensor cores and has a checkpoint format "
            "(compressed-tensors sparse-24-bitmask)", key=key, fix="use n: 2, m: 4",
        )


def nm_mask(scores: "torch.Tensor", n: int = 2, m: int = 4, *, name: str = "weight") -> "torch.Tensor":
    """Boolean mask of ``scores``' shape ``[out, in]`` keeping the ``n`` largest of every ``m`` consecutive input
    columns (ties: the lower column index wins). Any ``0 < n < m`` works here; the techniques accept 2:4 only."""
    import torch

    if not 0 < n < m:
        raise IncompatibleModelError(f"an N:M mask needs 0 < N < M (got {n}:{m})")
    if scores.dim() != 2:
        raise IncompatibleModelError(f"{name}: N:M masks apply to 2-D weights, got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if cols % m:
        raise IncompatibleModelError(
            f"{name}: input width {cols} is not a multiple of M={m}, so it cannot be cut into {n}:{m} groups; "
            "add the module to skip_modules")
    s = scores.detach().float()
    if torch.isnan(s).any():
        raise IncompatibleModelError(f"{name}: the pruning scores contain NaN; the weights or activations diverged")
    groups = s.reshape(rows, cols // m, m)
    order = torch.sort(-groups, dim=-1, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(rows, cols)


def magnitude_scores(weight: "torch.Tensor") -> "torch.Tensor":
    return weight.detach().abs().float()


def wanda_scores(weight: "torch.Tensor", input_sq_sum: "torch.Tensor") -> "torch.Tensor":
    """Wanda (Sun et al. 2024): ``|W_ij| · ‖X_j‖₂``, ``input_sq_sum[j] = Σ_tokens x_j²``."""
    return weight.detach().abs().float() * input_sq_sum.float().clamp_min(0).sqrt().to(weight.device)[None, :]


def nm_counts(mask_or_weight: "torch.Tensor", m: int = 4) -> "torch.Tensor":
    """Nonzeros per group of ``m`` (for checks: a 2:4 mask gives 2 everywhere)."""
    t = mask_or_weight.detach() != 0
    return t.reshape(t.shape[0], -1, m).sum(-1)


def is_nm(t: "torch.Tensor", n: int = 2, m: int = 4, *, exact: bool = False) -> bool:
    """Every group of ``m`` has at most (``exact``: exactly) ``n`` nonzeros."""
    if t.dim() != 2 or t.shape[1] % m:
        return False
    c = nm_counts(t, m)
    return bool((c == n).all()) if exact else bool((c <= n).all())
