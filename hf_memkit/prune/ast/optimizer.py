"""AST's AdamW with the annealed decay on pruned weights (Huang et al., AAAI 2025; thu-ml/Adaptive-Sparse-Trainer
``adamw.py``), as a pure update function and a ``torch.optim.Optimizer``.

For a weight with mask ``M`` (read from its Linear's ``sparse_mask`` at every step):
``m = EMA_β1(g)`` (the first moment sees the loss gradient only), ``u = m + λ_t (1 − M) ⊙ W``,
``v = EMA_β2(u²)``, ``W −= lr · u / ((√v / √(1−β2^t) + ε)(1−β1^t))``, with ``λ_t = λ · min(1, t / ramp)``.
The decay acts where ``M == 0`` only: the reference stores the mask as int and writes ``~mask`` (a bitwise NOT,
−1/−2), which this implementation does not copy. Decoupled weight decay (the Trainer's ``weight_decay``) applies
to the decay group as in torch AdamW. Parameters without a mask get plain AdamW.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...optimizer_slot.fp32_adamw import as_fp32, write_back_
from ..masked_optimizer import MaskedWeightOptimizer


def ast_update_(param: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, decay: float) -> None:
    w = as_fp32(param)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad.float(), 1 - beta1)
    u = exp_avg + decay * (~mask).to(w.dtype) * w if decay else exp_avg.clone()
    exp_avg_sq.mul_(beta2).addcmul_(u, u, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    w.addcdiv_(u, denom, value=-lr / (1 - beta1**step))
    write_back_(param, w)


def decay_at(step: int, decay: float, ramp_steps: int) -> float:
    return decay * min(1.0, step / max(ramp_steps, 1))


class ASTAdamW(MaskedWeightOptimizer):
    """``owners`` maps each masked parameter to its Linear (whose ``sparse_mask`` buffer is the live mask)."""

    def __init__(self, params, owners: dict[int, Any], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decay: float = 6e-5, ramp_steps: int = 1000):
        super().__init__(params, owners, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay=decay,
                                              ramp_steps=ramp_steps))

    def masked_step_(self, p: torch.Tensor, mask: torch.Tensor, state: dict[str, Any],
                     group: dict[str, Any]) -> None:
        b1, b2 = group["betas"]
        ast_update_(p, p.grad, mask, state["exp_avg"], state["exp_avg_sq"], step=state["step"],
                    lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decay=decay_at(state["step"], group["decay"], group["ramp_steps"]))
