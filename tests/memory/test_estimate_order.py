"""The estimate hooks run in the patching rule's order: module replacements first, then the slot order."""

from __future__ import annotations

from hf_memkit import load_recipe, registry
from hf_memkit.memory.estimate import ESTIMATE_ORDER, estimate_sequence


def test_every_slot_has_an_estimate_place():
    assert set(registry.SLOTS) == set(ESTIMATE_ORDER)


def test_module_replacements_estimate_first():
    techniques = load_recipe({"memkit": 1, "optimizer": {"sst": {}}, "activations": [{"mesa": {}}],
                              "loss": {"cce": {}}, "guard": [{"divergence_guard": {}}]}).build()
    order = [t.name for t in estimate_sequence(techniques)]
    assert order == ["sst", "cce", "mesa", "divergence_guard"], order
