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
    "MemkitCallback": ("hf_memkit.integrations.callback", "MemkitCallback"),
    "parse_memkit_args": ("hf_memkit.recipe_flags", "parse_memkit_args"),
    "estimate_memory": ("hf_memkit.memory.estimate", "estimate_memory"),
    "plan": ("hf_memkit.planner", "plan"),
    "MixLoraConfig": ("hf_memkit.adapters.mixlora.peft_config", "MixLoraConfig"),
    "LorcConfig": ("hf_memkit.adapters.lorc.peft_config", "LorcConfig"),
}

__all__ = [
    "CheckpointError", "IncompatibleModelError", "MemkitError", "ModelSourceError", "RecipeError",
    "RegistryError", "Recipe", "load_recipe", "register_technique", "PatchHandle", "Technique",
    "TechniqueConfig", *_LAZY,
]

if TYPE_CHECKING:  # pragma: no cover
    from .integrations.callback import MemkitCallback
    from .integrations.memkit_trainer import MemkitTrainer, MemkitTrainingArguments
    from .recipe_flags import parse_memkit_args
    from .integrations.trainer import apply_recipe
    from .adapters.lorc.peft_config import LorcConfig
    from .adapters.mixlora.peft_config import MixLoraConfig
    from .memory.estimate import estimate_memory
    from .planner import plan

# MIXLORA and LORC become PEFT adapter types as soon as peft is imported (now, if it already is)
from .integrations.peft_types import install_import_hook as _install_peft_types

_install_peft_types()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_memkit' has no attribute {name!r}")
