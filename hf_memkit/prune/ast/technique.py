from __future__ import annotations

from typing import Any, ClassVar

from ...errors import IncompatibleModelError
from ..sparse_training import SparseTrainingTechnique
from .config import ASTConfig


class ASTTechnique(SparseTrainingTechnique):
    name: ClassVar[str] = "ast"
    kind: ClassVar[str] = "ast"
    config_cls = ASTConfig
    summary: ClassVar[str] = "2:4 sparse training: STE masks refreshed every T steps, annealed decay, KL distillation"
    reference: ClassVar[str] = "Huang et al., AAAI 2025, arXiv 2407.20584 (thu-ml/Adaptive-Sparse-Trainer)"

    def distill_weights(self) -> tuple[float, float, float]:
        c = self.config
        return c.task_weight, c.kl_weight, c.temperature

    def install_kwargs_for(self, linear: Any) -> dict[str, Any]:
        k = self.config.slorb_k if self.config.slorb else None
        if k and linear.in_features % k:
            raise IncompatibleModelError(
                f"{self.key}: slorb_k={k} does not divide the input width {linear.in_features}; choose a divisor")
        return {"slorb_k": k}

    def create_optimizer(self, model: Any, args: Any):
        from .optimizer import ASTAdamW

        hp = self.hyperparameters(args)
        c = self.config
        return ASTAdamW(self.param_groups_for(model, hp["weight_decay"]), self.owners(), lr=hp["lr"],
                        betas=c.betas, eps=c.eps, weight_decay=hp["weight_decay"], decay=c.decay,
                        ramp_steps=max(1, int(c.decay_ramp * max(getattr(args, "max_steps", 0), 1))))

    def on_schedule(self, optimizer: Any, max_steps: int) -> None:
        for g in optimizer.param_groups:
            if "ramp_steps" in g:
                g["ramp_steps"] = max(1, int(self.config.decay_ramp * max(max_steps, 1)))

    def estimate_layer(self, mem: Any, module: str, shape: tuple[int, ...]) -> None:
        if self.config.slorb:
            mem.add_param(f"{module}.slorb_S", (shape[0], shape[1] // self.config.slorb_k), trainable=True,
                          category="weights")

    def final_mask_and_weight(self, name: str, lin: Any):
        # the mask the forward used: the projected layer gives the trained model's outputs exactly
        return lin.sparse_mask.clone(), lin.weight.detach().clone()
