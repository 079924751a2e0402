"""Techniques that hook library internals declare the versions they were verified on and warn outside them."""

from __future__ import annotations

import logging

from hf_memkit import registry
from hf_memkit.integrations import versions


def _hooking():
    return [e.technique_cls for e in registry.entries() if e.technique_cls.verified_with]


def test_the_techniques_that_hook_internals_declare_their_verified_versions():
    names = {cls.name for cls in _hooking()}
    assert {"mesa", "offload", "cce", "lisa", "sparse_update", "lora", "qlora", "mixlora", "co2"} <= names


def test_the_installed_versions_are_the_verified_ones():
    """constraints.txt (what CI installs) and the declarations agree: no technique is unverified here."""
    assert versions.unverified(_hooking()) == []


def test_a_version_outside_the_range_warns_once_naming_technique_and_fix(monkeypatch, caplog):
    monkeypatch.setattr(versions, "installed_version", lambda package: "9.0.0")
    monkeypatch.setattr(versions, "_warned", set())
    mesa = registry.get("mesa", "activations").technique_cls
    with caplog.at_level(logging.WARNING, logger="hf_memkit"):
        versions.warn_unverified([mesa])
        versions.warn_unverified([mesa])
    warnings = [r.getMessage() for r in caplog.records if "verified with" in r.getMessage()]
    assert len(warnings) == 1
    assert "'mesa'" in warnings[0] and "transformers>=" in warnings[0] and "9.0.0" in warnings[0]
    assert "constraints.txt" in warnings[0]


def test_a_recipe_run_warns_through_the_runtime(monkeypatch, caplog, tiny_model):
    from hf_memkit.integrations.trainer import RecipeRuntime
    from hf_memkit.recipe import load_recipe

    monkeypatch.setattr(versions, "installed_version", lambda package: "0.0.1")
    monkeypatch.setattr(versions, "_warned", set())
    runtime = RecipeRuntime(load_recipe({"loss": {"cce": {}}}))
    with caplog.at_level(logging.WARNING, logger="hf_memkit"):
        runtime.patch(tiny_model)
    runtime.unpatch()
    assert any("'cce' hooks transformers internals" in r.getMessage() for r in caplog.records)
