"""AdamS, CAST's optimizer (Huang et al., arXiv 2509.25996, Alg. 1 / Eq. 7–8 as reconstructed by the
third-party reimplementation ``liuhanzuo/Mixture-of-Memory/baselines/cast_repro``; the paper's method section
could not be read first-hand), as a pure update function and a ``torch.optim.Optimizer``.

``μ = EMA_β1(g)`` tracks the raw gradient; with ``α_t = t/T`` (T = the run's total steps),
``μ̃ = (1 − α_t) μ + α_t λ sign(θ_{t−1})`` where the mask is 0 and ``μ̃ = μ`` where it is 1; the second moment is
built from the blended value, ``v = EMA_β2(μ̃²)``, and ``θ −= lr (μ̃/(1−β1^t)) / (√(v/(1−β2^t)) + ε)``. ``μ̃`` is
not written back into ``μ``. Parameters without a mask (and the weight-scaling groups) get plain AdamW.
"""

from __future__ import annotations

from typing import Any

import torch

from ...optimizer_slot.fp32_adamw import as_fp32, write_back_
from ..masked_optimizer import MaskedWeightOptimizer


def adams_update_(param: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, *, step: int, total_steps: int, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, decay: float) -> None:
    w = as_fp32(param)
    alpha = min(1.0, step / max(total_steps, 1))
    exp_avg.lerp_(grad.float(), 1 - beta1)
    blended = torch.where(mask, exp_avg, (1 - alpha) * exp_avg + alpha * decay * torch.sign(w))
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    exp_avg_sq.mul_(beta2).addcmul_(blended, blended, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    w.addcdiv_(blended, denom, value=-lr / (1 - beta1**step))
    write_back_(param, w)


class AdamS(MaskedWeightOptimizer):
    """``owners`` maps each masked parameter to its Linear (whose ``sparse_mask`` buffer is the live mask);
    ``total_steps`` (T of α_t = t/T) is set from the Trainer's ``max_steps`` when training begins."""

    def __init__(self, params, owners: dict[int, Any], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decay: float = 1e-4, total_steps: int = 1000):
        super().__init__(params, owners, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay=decay,
                                              total_steps=total_steps))

    def masked_step_(self, p: torch.Tensor, mask: torch.Tensor, state: dict[str, Any],
                     group: dict[str, Any]) -> None:
        b1, b2 = group["betas"]
        adams_update_(p, p.grad, mask, state["exp_avg"], state["exp_avg_sq"],
                      step=state["step"], total_steps=group["total_steps"], lr=group["lr"], beta1=b1,
                      beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"], decay=group["decay"])
