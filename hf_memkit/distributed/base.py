"""Shared bits of the ``distributed`` techniques."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from ..technique import Technique


def configs_dir() -> Path:
    """The repository's ``configs/`` folder (DeepSpeed presets), found like ``recipes/``
    (:func:`hf_memkit.data.recipes.recipes_dir`): ``hf_memkit/_configs`` in a built wheel, else ``configs/`` beside
    the package."""
    here = Path(__file__).resolve().parent.parent  # hf_memkit/
    for cand in (here / "_configs", here.parent / "configs"):
        if cand.is_dir():
            return cand
    return here.parent / "configs"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_ranks() -> dict[str, Any]:
    """TrainingArguments that make the ranks CPU ranks on a machine without CUDA: accelerate only builds a
    multi-CPU (gloo) state when ``use_cpu`` is set, otherwise the Trainer refuses FSDP/DeepSpeed as "not
    distributed"."""
    import torch

    if torch.cuda.is_available():
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"}


class DistributedTechnique(Technique):
    """A technique of the ``distributed`` slot: it names the engine it selects (for the compatibility table)."""

    slot: ClassVar[str] = "distributed"

    @classmethod
    def engine_of_config(cls, config: Any) -> str:
        raise NotImplementedError

    def engine(self) -> str:
        return self.engine_of_config(self.config)
