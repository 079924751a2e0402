"""``distributed: {fsdp: {...}}`` — fills ``TrainingArguments.fsdp`` / ``fsdp_config``."""

from __future__ import annotations

from typing import Any, ClassVar

from ..base import DistributedTechnique, cpu_ranks, engine_runs_here
from .config import FSDPConfig


class FSDPTechnique(DistributedTechnique):
    name: ClassVar[str] = "fsdp"
    config_cls = FSDPConfig
    summary: ClassVar[str] = ("PyTorch FSDP (full_shard / shard_grad_op, optional CPU offload) filling the Trainer's "
                              "own `fsdp` arguments")
    reference: ClassVar[str] = "Zhao et al. 2023 (PyTorch FSDP)"
    conflicts: ClassVar[dict[str, str]] = {
        "training_args:fsdp": "distributed.fsdp sets TrainingArguments.fsdp itself",
        "training_args:deepspeed": "DeepSpeed and FSDP are two engines; the Trainer runs one",
    }

    @classmethod
    def engine_of_config(cls, config: FSDPConfig) -> str:
        return "fsdp"

    def training_args(self, model_config: Any = None) -> dict[str, Any]:
        if not engine_runs_here(self.name):
            return {}
        cfg = self.config
        options = [cfg.sharding] + (["auto_wrap"] if cfg.auto_wrap else []) + (["offload"] if cfg.offload else [])
        fsdp_config: dict[str, Any] = {"use_orig_params": cfg.use_orig_params}
        if cfg.auto_wrap and model_config is not None:
            layers = _layer_classes(model_config)
            if layers:
                fsdp_config["transformer_layer_cls_to_wrap"] = layers
        fsdp_config.update(cfg.fsdp_config)
        return {"fsdp": " ".join(options), "fsdp_config": fsdp_config, **cpu_ranks()}


def _layer_classes(model_config: Any) -> list[str]:
    from ...memory.estimate import meta_model

    return list(getattr(meta_model(model_config), "_no_split_modules", None) or [])
