from __future__ import annotations

from typing import Any, ClassVar

from ...optimizer_slot.technique import OptimizerTechnique
from .config import AdamWConfig


class AdamWTechnique(OptimizerTechnique):
    name: ClassVar[str] = "adamw"
    config_cls = AdamWConfig
    state_description: ClassVar[str] = "fp32 first and second moments (8 bytes/param)"
    summary: ClassVar[str] = "torch.optim.AdamW (fp32 moments, 8 bytes/param)"
    reference: ClassVar[str] = "Loshchilov & Hutter 2019; torch.optim.AdamW"

    def create_optimizer(self, model: Any, args: Any):
        import torch

        hp = self.hyperparameters(args)
        cfg = self.config
        return torch.optim.AdamW(
            self.param_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=cfg.betas, eps=cfg.eps,
            foreach=cfg.foreach,
        )

    def estimate(self, mem: Any) -> None:
        # exp_avg + exp_avg_sq in fp32 for every trainable element, plus a scalar step per tensor
        trainable = mem.trainable()
        mem.add("optimizer_states", sum(8 * p.numel + 4 for p in trainable), self.name, "2 fp32 moments")
        self.estimate_gradient_release(mem)
