"""Shared bits of the ``distributed`` techniques."""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from ..technique import Technique

logger = logging.getLogger("hf_memkit")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_ranks() -> dict[str, Any]:
    """TrainingArguments that make the ranks CPU ranks on a machine without CUDA: accelerate only builds a
    multi-CPU (gloo) state when ``use_cpu`` is set, otherwise the Trainer refuses FSDP/DeepSpeed as "not
    distributed". Nothing for one process."""
    import torch

    if torch.cuda.is_available() or world_size() == 1:
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"}


def engine_runs_here(name: str) -> bool:
    """Whether DeepSpeed/FSDP can run in this process. One process on a machine without CUDA cannot (the
    Trainer refuses a CPU engine outside a torchrun launch): the run then trains as a plain single process, with
    a warning, so a recipe stays usable for a quick local check. One CUDA process can (ZeRO-Offload on one GPU)."""
    import torch

    if world_size() > 1 or torch.cuda.is_available():
        return True
    logger.warning("hf_memkit: distributed.%s needs several ranks on a CPU-only machine; this single process "
                   "trains without it (launch with `memkit run --nproc-per-node N`)", name)
    return False


class DistributedTechnique(Technique):
    """A technique of the ``distributed`` slot: it names the engine it selects (for the compatibility table)."""

    slot: ClassVar[str] = "distributed"

    @classmethod
    def engine_of_config(cls, config: Any) -> str:
        raise NotImplementedError

