"""``distributed: {deepspeed: {...}}`` — fills ``TrainingArguments.deepspeed`` (and runs CPU ranks on gloo when
there is no CUDA). The config is resolved once: preset or file -> overrides -> host-memory budget."""

from __future__ import annotations

import copy
import json
import os
from typing import Any, ClassVar

from ...errors import RecipeError
from ...data.recipes import configs_dir
from ..base import DistributedTechnique, cpu_ranks, engine_runs_here, world_size
from ...engines import zero_engine
from .config import DeepSpeedConfig

KEY = "distributed.deepspeed"


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def base_config(cfg: DeepSpeedConfig) -> dict:
    path = cfg.config if cfg.config is not None else str(configs_dir() / f"{cfg.preset}.json")
    if not os.path.isfile(path):
        raise RecipeError(f"DeepSpeed config {path!r} does not exist", key=KEY,
                          fix="give an existing JSON file, or use a preset: zero2, zero3, zero3_offload, zero3_nvme")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:
        raise RecipeError(f"DeepSpeed config {path!r} is not valid JSON ({exc})", key=KEY,
                          fix="fix the JSON file") from None
    data = merge(data, cfg.overrides)
    if cfg.nvme_path:
        zero = data.get("zero_optimization") or {}
        for k in ("offload_param", "offload_optimizer"):
            if (zero.get(k) or {}).get("device") == "nvme":
                zero[k]["nvme_path"] = cfg.nvme_path
    return data


class DeepSpeedTechnique(DistributedTechnique):
    name: ClassVar[str] = "deepspeed"
    config_cls = DeepSpeedConfig
    summary: ClassVar[str] = ("DeepSpeed ZeRO-2/3 (+ CPU/NVMe offload) presets filling the Trainer's own "
                              "`deepspeed` argument; offload buffers sized to a host-RAM budget")
    reference: ClassVar[str] = "Rajbhandari et al. 2020 (ZeRO); Ren et al. 2021 (ZeRO-Offload); MemAscend"
    conflicts: ClassVar[dict[str, str]] = {
        "training_args:deepspeed": "distributed.deepspeed sets TrainingArguments.deepspeed itself",
        "training_args:fsdp": "DeepSpeed and FSDP are two engines; the Trainer runs one",
    }

    @classmethod
    def engine_of_config(cls, config: DeepSpeedConfig) -> str:
        if config.config is None:
            stage = {"zero2": 2}.get(config.preset, 3)
        else:
            try:
                stage = (base_config(config.model_copy(update={"overrides": {}})).get("zero_optimization")
                         or {}).get("stage", 0)
            except RecipeError:
                stage = 0
        stage = ((config.overrides.get("zero_optimization") or {}).get("stage", stage)
                 if isinstance(config.overrides.get("zero_optimization"), dict) else stage)
        return zero_engine(stage)

    def validate(self, ctx: Any) -> None:
        base_config(self.config)  # a missing or broken file fails before the model loads
        if ctx.model_config is not None and self.config.host_memory_gb:
            self.resolved(ctx.model_config)

    def resolved(self, model_config: Any = None, ranks: int | None = None) -> dict:
        """The DeepSpeed config this run hands to the Trainer."""
        data = base_config(self.config)
        if self.config.host_memory_gb and model_config is not None:
            from ...memory.host import GiB, size_to_budget

            num, hidden = count_params(model_config)
            try:
                data = size_to_budget(data, int(self.config.host_memory_gb * GiB), num,
                                      ranks or world_size(), dtype_bytes(model_config), hidden)
            except ValueError as exc:
                raise RecipeError(str(exc), key=f"{KEY}.host_memory_gb",
                                  fix="raise host_memory_gb, add ranks, or use preset zero3_nvme") from None
        return data

    def training_args(self, model_config: Any = None) -> dict[str, Any]:
        if not engine_runs_here(self.name):
            return {}
        return {"deepspeed": self.resolved(model_config), **cpu_ranks()}

    def estimate(self, mem: Any) -> None:
        import torch

        from ...memory.host import host_terms

        data = self.resolved(mem.model.config, mem.world_size)
        mem.zero_stage = int((data.get("zero_optimization") or {}).get("stage", 0))
        num = sum(p.numel for p in mem.params.values())
        largest = max((p.numel for p in mem.params.values()), default=0)
        for cat, n in host_terms(data, num, mem.world_size, mem.dtype_bytes, mem.model.config.hidden_size,
                                 largest, cuda=torch.cuda.is_available()).items():
            mem.host[cat] = mem.host.get(cat, 0) + n


def count_params(model_config: Any) -> tuple[int, int]:
    from ...memory.estimate import meta_model

    model = meta_model(model_config)
    return sum(p.numel() for p in model.parameters()), int(getattr(model_config, "hidden_size", 0) or 0)


def dtype_bytes(model_config: Any) -> int:
    dt = str(getattr(model_config, "torch_dtype", None) or getattr(model_config, "dtype", None) or "float32")
    return 2 if ("16" in dt) else 4
