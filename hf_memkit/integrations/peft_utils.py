"""PEFT wiring: build a LoraConfig from recipe fields, wrap a model reversibly, count adapter parameters."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from ..errors import IncompatibleModelError, RecipeError
from ..technique import PatchHandle


def lora_config(fields: dict, key: str, source: str | None = None):
    from peft import LoraConfig

    try:
        return LoraConfig(task_type="CAUSAL_LM", **fields)
    except (TypeError, ValueError) as exc:
        raise RecipeError(
            f"PEFT rejects these LoRA settings: {exc}", path=source, key=key, fix="correct the LoRA fields"
        ) from None


def wrap_with_peft(model: Any, config: Any, technique: str) -> PatchHandle:
    """``get_peft_model`` with an undo: ``remove()`` unloads the adapter (no merge) and restores the
    ``requires_grad`` flags, returning the very model object that came in."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise IncompatibleModelError(
            f"{technique}: the model already carries a PEFT adapter; the recipe's adapter slot would stack a "
            "second one. Pass the base model, or remove the adapter slot from the recipe"
        )
    from .bnb_cpu import keep_4bit_trainable

    keep_4bit_trainable(model)  # a 4-bit base repacked for CPU inference gives its input no gradient
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    had_input_hook = getattr(model, "_require_grads_hook", None) is not None
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise IncompatibleModelError(
            f"{technique} cannot patch {type(model).__name__}: {exc}. Set target_modules to module names this "
            "model has (see model.named_modules())"
        ) from None
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .patching import mark_put_

    for m in peft_model.modules():  # PEFT put these in: no other technique may swap them out (patching.swap_module)
        if isinstance(m, BaseTunerLayer):
            mark_put_(m, technique)
    if not had_input_hook and hasattr(model, "enable_input_require_grads"):
        # frozen embeddings + gradient checkpointing would otherwise cut the graph at the first layer
        model.enable_input_require_grads()

    def undo():
        base = peft_model.unload()
        if not had_input_hook and getattr(base, "_require_grads_hook", None) is not None:
            base.disable_input_require_grads()
        for n, p in base.named_parameters():
            p.requires_grad_(flags[n])
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(base):
                delattr(base, attr)
        return base

    return PatchHandle(peft_model, undo)


_SHAPES: dict[tuple[str, str], list[tuple[str, tuple[int, ...]]]] = {}


def lora_param_shapes(model: Any, fields: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the trainable adapter tensors LoRA would add to ``model`` (a meta-device copy is
    patched, so nothing is allocated). Remembered per (model class and config, adapter fields): PEFT's injection
    takes ~1 s on SmolLM2's meta model and ``memkit plan`` asks for the same shapes once per candidate."""
    import json

    config = getattr(model, "config", None)
    key = None
    if config is not None and hasattr(config, "to_json_string"):
        key = (f"{type(model).__qualname__}:{config.to_json_string(use_diff=False)}",
               json.dumps(fields, sort_keys=True, default=repr))
        if key in _SHAPES:
            return list(_SHAPES[key])
    shapes = _lora_param_shapes(model, fields)
    if key is not None:
        _SHAPES[key] = list(shapes)
    return shapes


def _lora_param_shapes(model: Any, fields: dict) -> list[tuple[str, tuple[int, ...]]]:
    from peft import get_peft_model

    meta = copy.deepcopy(model)
    with warnings.catch_warnings():  # PEFT still calls transformers' deprecated checkpointing property
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(meta, lora_config(fields, "adapter"))
    return [
        (n, tuple(p.shape))
        for n, p in peft_model.named_parameters()
        if p.requires_grad and "lora_" in n
    ]
