from __future__ import annotations

from typing import Any, ClassVar

from ...errors import IncompatibleModelError
from ..sparse_training import SparseTrainingTechnique
from .config import CASTConfig


class CASTTechnique(SparseTrainingTechnique):
    name: ClassVar[str] = "cast"
    kind: ClassVar[str] = "cast"
    config_cls = CASTConfig
    summary: ClassVar[str] = "2:4 sparse training: AdamS decay blend, learnable weight scaling, logit distillation"
    reference: ClassVar[str] = "Huang et al., arXiv 2509.25996 (CAST; method per a third-party reimplementation)"

    def distill_weights(self) -> tuple[float, float, float]:
        c = self.config
        return 1.0 - c.kl_weight, c.kl_weight, c.temperature

    def install_kwargs_for(self, linear: Any) -> dict[str, Any]:
        n = self.config.scale_groups
        if linear.in_features % n:
            raise IncompatibleModelError(
                f"{self.key}: scale_groups={n} does not divide the input width {linear.in_features}")
        return {"scale_groups": n}

    def create_optimizer(self, model: Any, args: Any):
        from .optimizer import AdamS

        hp = self.hyperparameters(args)
        c = self.config
        return AdamS(self.param_groups_for(model, hp["weight_decay"]), self.owners(), lr=hp["lr"], betas=c.betas,
                     eps=c.eps, weight_decay=hp["weight_decay"], decay=c.decay,
                     total_steps=max(getattr(args, "max_steps", 0), 1))

    def on_schedule(self, optimizer: Any, max_steps: int) -> None:
        for g in optimizer.param_groups:
            if "total_steps" in g:
                g["total_steps"] = max(max_steps, 1)

    def estimate_layer(self, mem: Any, module: str, shape: tuple[int, ...]) -> None:
        mem.add_param(f"{module}.cast_scale", (shape[0], self.config.scale_groups), trainable=True,
                      category="weights")

    def final_mask_and_weight(self, name: str, lin: Any):
        from ..masks import nm_mask
        from ..sparse_linear import effective_weight

        w = effective_weight(lin).detach().clone()  # prune with the final mask, then fold A into W
        return nm_mask(w.abs(), 2, 4, name=name), w
