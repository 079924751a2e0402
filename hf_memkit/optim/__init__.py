"""Optimizer techniques. ``Cosmos``, ``Fira`` and ``SST`` are plain ``torch.optim.Optimizer`` classes usable
outside the Trainer, and ``GradientRelease`` wraps a per-parameter optimizer to step it inside backward; they
load on first access so that ``import hf_memkit`` (which imports this package when the registry loads the
built-in techniques) stays free of torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "Cosmos": "hf_memkit.optim.cosmos.optimizer",
    "Fira": "hf_memkit.optim.fira.optimizer",
    "SST": "hf_memkit.optim.sst.optimizer",
    "GradientRelease": "hf_memkit.optimizer_slot.release.optimizer",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .cosmos.optimizer import Cosmos
    from .fira.optimizer import Fira
    from ..optimizer_slot.release.optimizer import GradientRelease
    from .sst.optimizer import SST


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_memkit.optim' has no attribute {name!r}")
