"""hf_memkit: memory-efficient training techniques for the stock ``transformers.Trainer``, chosen by a YAML
recipe. Public API only; heavy modules (torch, transformers) load on first use of what needs them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    IncompatibleModelError,
    MemkitError,
    ModelSourceError,
    RecipeError,
    RegistryError,
)
from .recipe import Recipe, load_recipe
from .registry import register_technique
from .technique import PatchHandle, Technique, TechniqueConfig

__version__ = "0.1.0"

_LAZY = {
    "apply_recipe": ("hf_memkit.integrations.trainer", "apply_recipe"),
    "detach_recipe": ("hf_memkit.integrations.trainer", "detach"),
    "MemkitTrainer": ("hf_memkit.integrations.memkit_trainer", "MemkitTrainer"),
    "MemkitTrainingArguments": ("hf_memkit.integrations.memkit_trainer", "MemkitTrainingArguments"),
    "estimate_memory": ("hf_memkit.memory.estimate", "estimate_memory"),
}

__all__ = [
    "CheckpointError", "IncompatibleModelError", "MemkitError", "ModelSourceError", "RecipeError",
    "RegistryError", "Recipe", "load_recipe", "register_technique", "PatchHandle", "Technique",
    "TechniqueConfig", *_LAZY,
]

if TYPE_CHECKING:  # pragma: no cover
    from .integrations.memkit_trainer import MemkitTrainer, MemkitTrainingArguments
    from .integrations.trainer import apply_recipe
    from .memory.estimate import estimate_memory


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_memkit' has no attribute {name!r}")
