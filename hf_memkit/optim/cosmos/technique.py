from __future__ import annotations

from typing import Any, ClassVar

from ...optimizer_slot.technique import OptimizerTechnique
from .config import CosmosConfig



_ENGINE_REASON = (
    "needs each weight's whole 2-D gradient (per-matrix projections); ZeRO hands the optimizer flat 1-D "
    "partitions and FSDP shards the matrices"
)


class CosmosTechnique(OptimizerTechnique):
    name: ClassVar[str] = "cosmos"
    config_cls = CosmosConfig
    state_description: ClassVar[str] = "SOAP factors in a rank-r eigensubspace + Muon momentum on the rest"
    summary: ClassVar[str] = "COSMOS: SOAP in a rank-r eigensubspace + Muon on the rest (~0.6x AdamW state)"
    reference: ClassVar[str] = "Liu et al. 2025; lliu606/COSMOS"
    unsupported_engines: ClassVar[dict[str, str]] = {e: _ENGINE_REASON for e in ("zero1", "zero2", "zero3", "fsdp")}
    conflicts: ClassVar[dict[str, str]] = {
        **OptimizerTechnique.conflicts,
    }

    def create_optimizer(self, model: Any, args: Any):
        from .optimizer import Cosmos, cosmos_param_groups

        hp = self.hyperparameters(args)
        cfg = self.config
        return Cosmos(cosmos_param_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=cfg.betas, eps=cfg.eps,
                      weight_decay=hp["weight_decay"], rank=cfg.rank, gamma=cfg.gamma, lr_ratio=cfg.lr_ratio,
                      nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, ns_dtype=cfg.ns_dtype)

    def estimate(self, mem: Any) -> None:
        from ..common.targets import hidden_matrix_names
        from .optimizer import cosmos_state_numel

        hidden = hidden_matrix_names(mem.model)
        matrices = other = 0
        for p in mem.trainable():
            if p.name in hidden and len(p.shape) == 2:
                matrices += 4 * cosmos_state_numel(*p.shape, self.config.rank)
            else:
                other += 8 * p.numel
        mem.add("optimizer_states", matrices, self.name, "hidden matrices: M + P + S + Vsq (fp32)")
        mem.add("optimizer_states", other, self.name, "AdamW path: 2 fp32 moments")
        self.estimate_gradient_release(mem)
