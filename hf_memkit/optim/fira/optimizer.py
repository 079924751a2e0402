"""Fira (Chen et al. 2024, xichen-fy/Fira): GaLore's low-rank Adam plus the full-rank residual of the
gradient, scaled by the low-rank Adam's norm ratio and held back by a norm-growth limiter.

Pure update functions first, then :class:`Fira`. For a projected m×n weight with gradient G (fp32):

1. every ``update_proj_gap`` steps (step 0 included): P from the SVD of G — if m ≥ n, P = Vhᵣ (r×n) and
   R = G·Pᵀ (m×r); else P = Uᵣ (m×r) and R = Pᵀ·G (r×n). ``back(X)`` is X·P or P·X.
2. Adam on R without bias correction inside: Mr, Vr, N = Mr/(sqrt(Vr) + ε); step size η = lr·sqrt(1−β2^t)/(1−β1^t).
3. φ = ‖N‖/‖R‖ along the rank dimension, one value per row (m ≥ n) or per column (m < n); the residual
   S = (G − α·back(R))·φ.
4. limiter: if ‖S‖ > γ·‖S_prev‖ then S ← S·γ·‖S_prev‖/‖S‖; ‖S_prev‖ stores the norm after limiting.
5. W ← W − η·(α·back(N) + S), then W ← W − lr·wd·W.

Notes on the reference: the residual subtracts α·back(R) (the paper writes G − back(R); they agree at α = 1).
Adam moments are kept when P is refreshed (as GaLore does). Two guards are added: ‖R‖ per row/column is
floored at 1e-8 (the reference adds 1e-8 too), and the limiter does not act while the stored previous norm is
0 (a zero residual, as at full rank, would otherwise pin every later residual to 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...optimizer_slot.fp32_adamw import FP32StateOptimizer, as_fp32, write_back_


def projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """P from the SVD of ``grad``: r×n right vectors when m ≥ n, else m×r left vectors."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    m, n = grad.shape
    return vh[:rank].contiguous() if m >= n else u[:, :rank].contiguous()


def project(grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    m, n = grad.shape
    return grad @ p.mT if m >= n else p.mT @ grad


def project_back(low: torch.Tensor, p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    m, n = shape
    return low @ p if m >= n else p @ low


def scaled_residual(grad: torch.Tensor, low: torch.Tensor, normed: torch.Tensor, p: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """(G − α·back(R))·φ with φ = ‖N‖/‖R‖ over the rank dimension, per row (m ≥ n) or column (m < n)."""
    m, n = grad.shape
    dim = 1 if m >= n else 0
    phi = normed.norm(dim=dim, keepdim=True) / low.norm(dim=dim, keepdim=True).clamp_min(1e-8)
    return (grad - alpha * project_back(low, p, grad.shape)) * phi


def limit_growth_(residual: torch.Tensor, prev_norm: torch.Tensor, gamma: float) -> torch.Tensor:
    """Scale ``residual`` in place so that ‖S‖ ≤ γ·‖S_prev‖ (no limit while ``prev_norm`` is 0); store the
    post-limit norm in ``prev_norm`` (a 0-d fp32 tensor). No host sync."""
    norm = residual.norm()
    bound = gamma * prev_norm
    factor = torch.where((prev_norm > 0) & (norm > bound), bound / norm.clamp_min(1e-30), torch.ones_like(norm))
    residual.mul_(factor)
    prev_norm.copy_(norm * factor)
    return residual


def fira_direction(grad: torch.Tensor, state: dict[str, Any], *, step: int, rank: int, update_proj_gap: int,
                   alpha: float, beta1: float, beta2: float, eps: float, gamma: float) -> torch.Tensor:
    """Update ``state`` ``{p, exp_avg, exp_avg_sq, residual_norm}`` in place for ``grad`` at ``step`` (counted
    from 1) and return α·back(N) + S; the caller multiplies it by η = lr·sqrt(1−β2^t)/(1−β1^t)."""
    if (step - 1) % update_proj_gap == 0:
        state["p"].copy_(projection(grad, rank))
    p = state["p"]
    low = project(grad, p)
    state["exp_avg"].lerp_(low, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(low, low, value=1 - beta2)
    normed = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + eps)
    residual = scaled_residual(grad, low, normed, p, alpha)
    limit_growth_(residual, state["residual_norm"], gamma)
    return residual.add_(project_back(normed, p, grad.shape), alpha=alpha)


def fira_state_numel(m: int, n: int, rank: int) -> int:
    """fp32 elements per projected m×n matrix: Mr + Vr (max(m,n)·r each) + P (min(m,n)·r) + 1 limiter norm."""
    r = min(rank, m, n)
    return 2 * max(m, n) * r + min(m, n) * r + 1


class Fira(FP32StateOptimizer):
    """Fira for the parameters of groups marked ``"fira": True`` (2-D only), AdamW for the rest.

    ``Fira([{"params": other}, {"params": matrices, "fira": True}], lr=1e-3, rank=64)`` — the same grouping
    as GaLore's ``{"rank": ...}`` groups. Per-group options ``rank``, ``update_proj_gap``, ``alpha`` and
    ``limiter`` override the defaults. State is fp32 for any parameter dtype.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 64, update_proj_gap: int = 200, alpha: float = 0.25,
                 limiter: float = 1.01):
        for name, value in (("lr", lr), ("eps", eps), ("rank", rank), ("update_proj_gap", update_proj_gap)):
            if not value > 0:
                raise ValueError(f"Fira: {name} must be positive (got {value!r})")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Fira: betas must lie in [0, 1) (got {betas!r})")
        if limiter < 1:
            raise ValueError(f"Fira: limiter γ must be at least 1 (got {limiter!r}); 1.01 is the paper's")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, alpha=alpha, limiter=limiter, fira=False)
        super().__init__(params, defaults)

    def param_step_(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if group["fira"] and p.dim() == 2:
            self._fira_param(p, state, group)
        else:
            self.adamw_param_(p, state, group)

    def _fira_param(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        m, n = p.shape
        r = min(group["rank"], m, n)
        if not state:
            f32 = dict(dtype=torch.float32, device=p.device)
            low = (m, r) if m >= n else (r, n)
            state.update(step=0, p=torch.zeros((r, n) if m >= n else (m, r), **f32),
                         exp_avg=torch.zeros(low, **f32), exp_avg_sq=torch.zeros(low, **f32),
                         residual_norm=torch.zeros((), **f32))
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        direction = fira_direction(p.grad.float(), state, step=t, rank=r, update_proj_gap=group["update_proj_gap"],
                                   alpha=group["alpha"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                   gamma=group["limiter"])
        w = as_fp32(p)
        w.add_(direction, alpha=-group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t))
        if group["weight_decay"]:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])
        write_back_(p, w)


def fira_param_groups(model: torch.nn.Module, target_modules: "str | list[str]", weight_decay: float = 0.0
                      ) -> list[dict[str, Any]]:
    """The Trainer's decay grouping, each group split into projected weights (``fira: True``) and the rest."""
    from ...integrations.trainer_utils import decay_parameter_groups
    from ..common.targets import resolve_target_linears, split_by_identity

    chosen = {id(m.weight) for _, m in resolve_target_linears(model, target_modules, key="optimizer.fira")}
    groups = []
    for g in decay_parameter_groups(model, weight_decay):
        inside, outside = split_by_identity(g["params"], chosen)
        if inside:
            groups.append({**g, "params": inside, "fira": True})
        if outside:
            groups.append({**g, "params": outside, "fira": False})
    return groups
