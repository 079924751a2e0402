from __future__ import annotations

from typing import Any, ClassVar

from ...optimizer_slot.technique import OptimizerTechnique
from .config import FiraConfig


_ENGINE_REASON = (
    "needs each weight's whole 2-D gradient (per-matrix projections); ZeRO hands the optimizer flat 1-D "
    "partitions and FSDP shards the matrices"
)


class FiraTechnique(OptimizerTechnique):
    name: ClassVar[str] = "fira"
    config_cls = FiraConfig
    state_description: ClassVar[str] = "Adam moments of the rank-r GaLore projection only"
    summary: ClassVar[str] = "Fira: GaLore low-rank Adam + scaled full-rank residual (~0.15x AdamW state)"
    reference: ClassVar[str] = "Chen et al. 2024; xichen-fy/Fira"
    unsupported_engines: ClassVar[dict[str, str]] = {e: _ENGINE_REASON for e in ("zero1", "zero2", "zero3", "fsdp")}
    conflicts: ClassVar[dict[str, str]] = {
        **OptimizerTechnique.conflicts,
        "sparse_update": "Fira projects the gradients of whole trainable Linear weights; a sparse update freezes "
                         "them and trains column slices",
    }

    def create_optimizer(self, model: Any, args: Any):
        from .optimizer import Fira, fira_param_groups

        hp = self.hyperparameters(args)
        cfg = self.config
        return Fira(fira_param_groups(model, cfg.target_modules, hp["weight_decay"]), lr=hp["lr"], betas=cfg.betas,
                    eps=cfg.eps, weight_decay=hp["weight_decay"], rank=cfg.rank, update_proj_gap=cfg.update_proj_gap,
                    alpha=cfg.alpha, limiter=cfg.limiter)

    def estimate(self, mem: Any) -> None:
        from .optimizer import fira_state_numel
        from ..common.targets import resolve_target_linears

        chosen = {f"{n}.weight" for n, _ in resolve_target_linears(mem.model, self.config.target_modules,
                                                                   key=f"optimizer.{self.name}")}
        projected = other = 0
        for p in mem.trainable():
            if p.name in chosen and len(p.shape) == 2:
                projected += 4 * fira_state_numel(*p.shape, self.config.rank)
            else:
                other += 8 * p.numel
        mem.add("optimizer_states", projected, self.name, "projected: low-rank Adam moments + P + limiter norm")
        mem.add("optimizer_states", other, self.name, "AdamW path: 2 fp32 moments")
        self.estimate_gradient_release(mem)
