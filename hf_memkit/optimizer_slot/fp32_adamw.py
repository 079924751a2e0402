"""What COSMOS, Fira and SST share: the AdamW update for the parameters outside their matrix path, and an
Optimizer base that keeps fp32 state for low-precision parameters across ``load_state_dict``.

The AdamW update is torch.optim.AdamW's (decoupled decay, bias correction 1-β1^t and 1-β2^t for any β), in
fp32 whatever the parameter dtype. The COSMOS reference instead scales the gradient by 0.1 and corrects with
1-0.9^t, which is right only for β1 = 0.9.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step on ``param`` in place; ``step`` counts from 1; moments are fp32 and updated in place."""
    w = as_fp32(param)
    g = grad.float()
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    write_back_(param, w)


def as_fp32(param: torch.Tensor) -> torch.Tensor:
    """The parameter itself when fp32 (updated in place), else an fp32 copy (written back by write_back_)."""
    return param.data if param.dtype == torch.float32 else param.data.float()


def write_back_(param: torch.Tensor, w: torch.Tensor) -> None:
    if w.data_ptr() != param.data_ptr():
        param.data.copy_(w)


class FP32StateOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype,
    which would round fp32 moments of a bf16 model to bf16 on resume and break the "resume gives the same next
    step" guarantee. This base restores each tensor with its saved dtype (on the parameter's device). Step
    counters are Python ints, so that optimizer-state bytes are exactly the tensors each algorithm needs."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, entry in saved.items():
            p = params[int(index)]
            for k, v in entry.items():
                if isinstance(v, torch.Tensor):
                    self.state[p][k] = v.to(device=p.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        """The usual loop over parameters with a gradient; each one is updated by :meth:`param_step_`
        (AdamW unless a subclass routes it elsewhere)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use dense embeddings")
                self.param_step_(p, self.state[p], group)
        return loss

    def param_step_(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        self.adamw_param_(p, state, group)

    @staticmethod
    def init_moments_(p: torch.Tensor, state: dict[str, Any]) -> None:
        """fp32 Adam moments and a step counter for ``p``, once; then count one more step."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        state["step"] += 1

    @classmethod
    def adamw_param_(cls, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        cls.init_moments_(p, state)
        beta1, beta2 = group["betas"]
        adamw_update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"], lr=group["lr"],
                      beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
