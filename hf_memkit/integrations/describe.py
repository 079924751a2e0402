"""Model facts for the start-of-training block (``Technique.describe``): what an adapter wrapped, what was
quantized. Reads PEFT/bitsandbytes module types, so it lives with the other library glue."""

from __future__ import annotations

from collections import Counter
from typing import Any


def _suffixes(names: list[str], most: int = 8) -> str:
    counts = Counter(n.rsplit(".", 1)[-1] for n in names)
    shown = ", ".join(counts if len(counts) <= most else list(counts)[:most] + ["..."])
    return shown or "none"


def lora_modules(model: Any) -> list[str]:
    """Names of the modules that carry a LoRA-style adapter (PEFT tuner layers with ``lora_A``)."""
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def adapter_line(model: Any, what: str) -> str:
    mods = lora_modules(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{what} on {len(mods)} modules ({_suffixes(mods)}); {trainable:,} trainable parameters, base frozen"


def quantized_4bit(model: Any) -> tuple[int, str]:
    """How many Linear layers hold 4-bit bitsandbytes weights, and their quantization type."""
    count, kinds = 0, set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        state = getattr(w, "quant_state", None)
        if state is not None:
            count += 1
            kinds.add(str(getattr(state, "quant_type", "4-bit")))
    return count, "/".join(sorted(kinds)) or "4-bit"


def optimizer_line(optimizer: Any, state: str) -> str:
    if optimizer is None:
        return f"(built when training starts); state {state}"
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    params = [p for g in inner.param_groups for p in g["params"]]
    return (f"{type(inner).__module__.split('.')[0]}.{type(inner).__name__} over {len(params)} tensors "
            f"({sum(p.numel() for p in params):,} parameters); state {state}")
