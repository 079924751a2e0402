"""The winner-take-all column-row sampler (pure functions, any device).

∇W = Σ_i ∇Y_iᵀ X_i over the N token rows. With probabilities p_i (here ∝ ‖X_i‖: the output-gradient norms are
unknown in forward and WTA-CRS's per-example cache of last epoch's norms is not kept), the |C| rows of largest
p_i are kept deterministically ("winners"), and s = k − |C| rows are drawn with replacement from the rest with
probability p_i / (1 − P_C). Estimate = Σ_{c∈C} ∇Y_cᵀX_c + (1 − P_C)/s · Σ_j ∇Y_{i_j}ᵀX_{i_j} / p_{i_j}: unbiased.
|C| is chosen adaptively: with the k largest probabilities sorted and P_c their cumulative sum, c* = argmin_c
(1 − P_c)/(k − c) (c = 0 is plain column-row sampling).
"""

from __future__ import annotations

import math

import torch


def sample_size(n: int, ratio: float, min_k: int) -> int:
    return min(n, max(min_k, math.ceil(ratio * n)))


def row_probabilities(x2: torch.Tensor) -> torch.Tensor:
    norms = x2.float().norm(dim=1)
    total = norms.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(norms, 1.0 / norms.numel())
    return norms / total


def choose_rows(p: torch.Tensor, k: int, winners: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (k, int64) and per-row weights (k, fp32) such that Σ_j w_j ∇Y_{idx_j}ᵀ X_{idx_j} is an unbiased
    estimate of ∇W."""
    n = p.numel()
    if k >= n:
        return torch.arange(n, device=p.device), torch.ones(n, device=p.device)
    c = 0
    top_p, top_i = torch.topk(p, k)
    if winners:
        cum = torch.cat([top_p.new_zeros(1), torch.cumsum(top_p, 0)[:-1]])  # P_c for c = 0..k-1
        score = (1 - cum).clamp_min(0) / torch.arange(k, 0, -1, device=p.device, dtype=cum.dtype)
        c = int(torch.argmin(score).item())
    win = top_i[:c]
    s = k - c
    rest = p.clone()
    rest[win] = 0
    mass = rest.sum()
    if mass <= 0:  # everything is in the winners: the rest contributes nothing
        idx = torch.cat([win, top_i[c:]])
        return idx, torch.cat([torch.ones(c, device=p.device), torch.zeros(s, device=p.device)])
    drawn = torch.multinomial(rest / mass, s, replacement=True)
    w = mass / (s * p[drawn])
    return torch.cat([win, drawn]), torch.cat([torch.ones(c, device=p.device), w.float()])
