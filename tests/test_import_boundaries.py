"""Import boundaries: ``integrations/`` (the layer over transformers/PEFT) imports no technique package, and no
technique package imports another's internals. Shared code lives in neutral packages (``compress/``: the quantization
grid, quantized Linear state, calibration, the block walker; ``integrations/``; ``memory/``). The edges that exist
today are listed in ``KNOWN`` as debt (the optimizer base and fp32 AdamW that prune/precision build on, LoRC's
adapter running the quant pass, oneshot running the prune pass); a new edge fails, and so does a listed edge that is
gone (delete it from the list)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "hf_memkit"
TECHNIQUE_PACKAGES = {"activations", "adapters", "losses", "optim", "prune", "quant", "schedules", "precision",
                      "guards", "distributed"}

KNOWN = {
    "adapters/lorc/tuner.py -> quant",
    "precision/bf16/optimizer.py -> optim",
    "prune/ast/optimizer.py -> optim",
    "prune/cast/optimizer.py -> optim",
    "prune/masked_optimizer.py -> optim",
    "prune/sparse_training.py -> optim",
    "quant/oneshot.py -> prune",
}


def _edges() -> set[str]:
    found = set()
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT).parts
        if len(rel) < 2:
            continue
        pkg = rel[0]
        if pkg != "integrations" and pkg not in TECHNIQUE_PACKAGES:
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


def test_integrations_imports_no_technique_package():
    """The wiring layer is below every technique: no exception list for it."""
    found = sorted(e for e in _edges() if e.startswith("integrations/"))
    assert not found, f"integrations/ imports technique packages: {found}; move the shared code to a neutral module"

