"""Per-parameter optimizer state, for schedules that change what trains while an optimizer already exists.

The optimizer is built by the Trainer (stock ``optim``) or by the recipe's optimizer technique, and accelerate
wraps it; these helpers see through the wrappers and work on any optimizer that keeps its state in the
``torch.optim.Optimizer`` layout (``optimizer.state[param] -> dict``), which covers torch's optimizers and
bitsandbytes' 8-bit ones. Engines that flatten parameters (DeepSpeed ZeRO, FSDP with flat params) keep state
per flat buffer instead; the schedules reject them before training.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import IncompatibleModelError


def inner_optimizer(optimizer: Any) -> Any:
    """The optimizer under accelerate's (and similar) wrappers."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def optimized_parameters(optimizer: Any) -> set[int]:
    inner = inner_optimizer(optimizer)
    return {id(p) for g in getattr(inner, "param_groups", []) for p in g["params"]}


def check_per_parameter_state(optimizer: Any, key: str) -> Any:
    inner = inner_optimizer(optimizer)
    if not isinstance(getattr(inner, "state", None), dict) or not hasattr(inner, "param_groups"):
        raise IncompatibleModelError(
            f"{key}: the optimizer {type(inner).__name__} keeps no per-parameter state dict "
            "(optimizer.state[param]), so the state of deactivated parameters cannot be dropped; use a "
            "torch.optim / bitsandbytes optimizer (e.g. optimizer: {adamw: {}} or {adamw_8bit: {}})"
        )
    return inner


def drop_state(optimizer: Any, params: Iterable[Any]) -> int:
    """Forget the optimizer state of ``params`` (they restart from fresh state when they train again);
    returns how many parameters had state."""
    inner = inner_optimizer(optimizer)
    dropped = 0
    for p in params:
        if inner.state.pop(p, None) is not None:
            dropped += 1
    return dropped
