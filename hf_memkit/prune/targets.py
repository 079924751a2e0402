"""Which Linear layers a 2:4 technique prunes, and how a pruned layer is marked for the exporter."""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import IncompatibleModelError

#: attribute set on a Linear whose weight is exactly N:M sparse (read by the exporter and the checks)
SPARSITY_ATTR = "memkit_sparsity"
#: optional keep mask that goes with it (so kept weights that are exactly zero stay kept in the export)
MASK_ATTR = "memkit_sparsity_mask"


def sparse_targets(model: Any, skip: Iterable[str], key: str, m: int = 4) -> dict[str, Any]:
    """Every plain ``nn.Linear`` not in ``skip``; each input width must be a multiple of ``m``."""
    from ..compress.linear import target_linears

    targets = target_linears(model, skip)
    if not targets:
        raise IncompatibleModelError(
            f"{key}: {type(model).__name__} has no plain nn.Linear layer to sparsify; N:M sparsity needs "
            "torch.nn.Linear projections (check skip_modules)")
    bad = [f"{n} (in_features={t.in_features})" for n, t in targets.items() if t.in_features % m]
    if bad:
        raise IncompatibleModelError(
            f"{key}: input width not a multiple of {m} for {', '.join(bad[:3])}; add them to skip_modules")
    return targets


def mark_sparse_(linear: Any, mask: Any, pattern: str = "2:4") -> None:
    setattr(linear, SPARSITY_ATTR, pattern)
    setattr(linear, MASK_ATTR, mask.detach().to(device="cpu", dtype=__import__("torch").bool))


def unmark_sparse_(linear: Any) -> None:
    for a in (SPARSITY_ATTR, MASK_ATTR):
        if hasattr(linear, a):
            delattr(linear, a)


def sparse_modules(model: Any) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in model.named_modules() if getattr(m, SPARSITY_ATTR, None)]
