"""Import boundaries: ``integrations/`` (the layer over transformers/PEFT) imports no technique package, and no
technique package imports another's internals. Shared code lives in neutral packages (``compress/``: the quantization
grid, quantized Linear state, calibration, the block walker, and the passes run by name through the registry;
``optimizer_slot/``: the optimizer technique base, fp32-state optimizers, gradient release; ``integrations/``;
``memory/``). ``KNOWN`` lists tolerated edges (none today); a new edge fails, and so does a listed edge that is gone."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "hf_memkit"
TECHNIQUE_PACKAGES = {"activations", "adapters", "losses", "optim", "prune", "quant", "schedules", "precision",
                      "guards", "distributed"}

#: the layers below every technique: they import no technique package at all (no exception list)
NEUTRAL = ("integrations", "compress", "optimizer_slot")
KNOWN: set[str] = set()


def _edges() -> set[str]:
    found = set()
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT).parts
        if len(rel) < 2:
            continue
        pkg = rel[0]
        if pkg not in NEUTRAL and pkg not in TECHNIQUE_PACKAGES:
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = list(rel[:-1])[: len(rel) - node.level] if node.level > 1 else list(rel[:-1])
                full = base + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("hf_memkit."):
                full = node.module.split(".")[1:]
            else:
                continue
            if full and full[0] in TECHNIQUE_PACKAGES and full[0] != pkg:
                found.add(f"{'/'.join(rel)} -> {full[0]}")
    return found


def test_no_new_cross_package_imports():
    new = sorted(_edges() - KNOWN)
    assert not new, ("new imports across technique packages (or from integrations/ into one): "
                     f"{new}; put shared code in a neutral module (integrations/patching.py, memory/, recipe.py)")


def test_the_known_edges_are_still_there():
    gone = sorted(KNOWN - _edges())
    assert not gone, f"these listed imports are gone; delete them from KNOWN: {gone}"


def test_neutral_packages_import_no_technique_package():
    """The wiring layer and the shared machinery sit below every technique: no exception list for them (a pass
    of a technique is reached by name through the registry, hf_memkit.compress.passes)."""
    found = sorted(e for e in _edges() if e.split("/")[0] in NEUTRAL)
    assert not found, f"{', '.join(NEUTRAL)} import technique packages: {found}; move the shared code to a neutral module"
