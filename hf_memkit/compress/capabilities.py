"""Roles and capability lookups of the compress techniques, read from their classes through the registry."""

from __future__ import annotations

from typing import Any

QUANTIZER, COMPENSATOR, TRAINER, PRUNER = "quantizer", "compensator", "trainer", "pruner"


def technique_class(name: str) -> Any:
    """The registered ``compress`` technique class called ``name``, or None."""
    from .. import registry

    entry = registry.get(name, "compress")
    return entry.technique_cls if entry is not None else None


def capability(name: str, attr: str, default: Any = None) -> Any:
    """``attr`` of the compress technique ``name`` (``role``, ``calibrated``, ``keeps_nm``, ...)."""
    cls = technique_class(name)
    return getattr(cls, attr, default) if cls is not None else default


def names_with(role: str) -> list[str]:
    """Every registered compress technique of ``role``, in registry order (for error messages)."""
    from .. import registry

    return [e.name for e in registry.entries() if e.slot == "compress" and getattr(e.technique_cls, "role", None)
            == role]
