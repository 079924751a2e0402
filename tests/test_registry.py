"""The technique registry: built-ins, duplicate names, rejected classes, and third-party entry points."""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import BaseModel, Field

import hf_memkit
from hf_memkit import RecipeError, RegistryError, Technique, TechniqueConfig, load_recipe, registry
from hf_memkit.adapters.lora.config import LoraConfigFields
from hf_memkit.adapters.lora.technique import LoraTechnique
from hf_memkit.adapters.qlora.config import QLoraConfig
from hf_memkit.adapters.qlora.technique import QLoraTechnique
from hf_memkit.optim.adamw.config import AdamWConfig
from hf_memkit.optim.adamw.technique import AdamWTechnique
from hf_memkit.optim.adamw_8bit.config import AdamW8bitConfig
from hf_memkit.optim.adamw_8bit.technique import AdamW8bitTechnique


@pytest.fixture
def restore_registry():
    """Snapshot the whole registry state and put it back after the test, whatever the test did to it."""
    registry._ensure_loaded()
    table = dict(registry._TABLE)
    loaded = registry._loaded
    failures = dict(registry.PLUGIN_FAILURES)
    yield
    registry._TABLE.clear()
    registry._TABLE.update(table)
    registry._loaded = loaded
    registry._loading = False
    registry.PLUGIN_FAILURES.clear()
    registry.PLUGIN_FAILURES.update(failures)


# ---------------------------------------------------------------------------------------------------------
# built-ins

BUILTINS = {
    "adamw": ("optimizer", AdamWTechnique, AdamWConfig),
    "adamw_8bit": ("optimizer", AdamW8bitTechnique, AdamW8bitConfig),
    "lora": ("adapter", LoraTechnique, LoraConfigFields),
    "qlora": ("adapter", QLoraTechnique, QLoraConfig),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_present_with_its_slot(name: str):
    slot, technique_cls, config_cls = BUILTINS[name]
    entry = registry.get(name)
    assert entry is not None
    assert (entry.name, entry.slot, entry.technique_cls, entry.config_cls) == (name, slot, technique_cls, config_cls)
    assert entry.origin == "builtin"
    assert technique_cls.name == name and technique_cls.slot == slot
    assert name in registry.names(slot)
    assert technique_cls.summary and technique_cls.reference, "the README table needs both"


def test_names_and_entries():
    assert {"adamw", "adamw_8bit"} <= set(registry.names("optimizer"))
    assert not {"lora", "qlora"} & set(registry.names("optimizer"))
    assert {"lora", "qlora"} <= set(registry.names("adapter"))
    assert registry.names() == [e.name for e in registry.entries()]
    order = list(registry.SLOTS)
    keys = [(order.index(e.slot), e.name) for e in registry.entries()]
    assert keys == sorted(keys)  # slot order, then name
    assert registry.get("no_such_technique") is None


def test_registry_error_is_a_value_error():
    assert issubclass(RegistryError, ValueError) and issubclass(RegistryError, hf_memkit.MemkitError)


# ---------------------------------------------------------------------------------------------------------
# duplicates and replace


class _FakeLora(Technique):
    name: ClassVar[str] = "lora"
    slot: ClassVar[str] = "adapter"


def test_duplicate_name_names_both_classes(restore_registry):
    with pytest.raises(RegistryError) as info:
        registry.register_technique(_FakeLora)
    text = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'lora'" in text
    assert "hf_memkit.adapters.lora.technique.LoraTechnique (builtin)" in text
    assert f"{__name__}._FakeLora (user)" in text
    assert "replace=True" in text
    assert registry.get("lora").technique_cls is LoraTechnique  # unchanged


def test_duplicate_from_the_public_decorator(restore_registry):
    with pytest.raises(RegistryError, match="already registered"):

        @hf_memkit.register_technique
        class Again(Technique):
            name: ClassVar[str] = "adamw_8bit"
            slot: ClassVar[str] = "optimizer"

    assert registry.get("adamw_8bit").technique_cls is AdamW8bitTechnique


def test_registering_the_same_class_twice_is_harmless(restore_registry):
    before = registry.get("lora")
    registry.register_technique(LoraTechnique, origin="builtin")
    assert registry.get("lora") == before


def test_replace_true(restore_registry):
    registry.register_technique(_FakeLora, replace=True, origin="test override")
    entry = registry.get("lora")
    assert entry.technique_cls is _FakeLora and entry.origin == "test override"
    assert entry.config_cls is TechniqueConfig
    # recipes now build the replacement
    built, = load_recipe({"adapter": "lora"}).build()
    assert type(built) is _FakeLora
    with pytest.raises(RecipeError, match="unknown setting 'r'"):
        load_recipe({"adapter": {"lora": {"r": 8}}})


def test_decorator_forms_and_unregister(restore_registry):
    @registry.register_technique
    class Plain(Technique):
        name: ClassVar[str] = "memkit_test_plain"
        slot: ClassVar[str] = "compress"

    @registry.register_technique(origin="test", replace=True)
    class WithArgs(Technique):
        name: ClassVar[str] = "memkit_test_with_args"
        slot: ClassVar[str] = "loss"

    assert isinstance(Plain, type) and isinstance(WithArgs, type)  # the decorator returns the class
    assert registry.get("memkit_test_plain").origin == "user"
    assert registry.get("memkit_test_with_args").origin == "test"
    registry.unregister_technique("memkit_test_plain")
    assert registry.get("memkit_test_plain") is None
    with pytest.raises(RegistryError, match="no technique named 'memkit_test_plain'"):
        registry.unregister_technique("memkit_test_plain")


# ---------------------------------------------------------------------------------------------------------
# rejected classes


class _Required(TechniqueConfig):
    size: int = Field(description="no default")


def _technique(**attrs) -> type:
    attrs.setdefault("name", "memkit_test_bad")
    attrs.setdefault("slot", "compress")
    return type("BadTechnique", (Technique,), attrs)


class _NotATechnique:
    name = "memkit_test_bad"
    slot = "compress"
    config_cls = TechniqueConfig


class _PlainModel(BaseModel):
    x: int = 1


BAD_CLASSES = [
    ("no-name", _technique(name=""), "not a valid technique name"),
    ("upper-case-name", _technique(name="MyOptimizer"), "lower-case identifier"),
    ("dashed-name", _technique(name="my-opt"), "not a valid technique name"),
    ("non-string-name", _technique(name=3), "not a valid technique name"),
    ("no-slot", _technique(slot=""), "is not a slot; choose one of loss, optimizer, adapter"),
    ("misspelled-slot", _technique(slot="optimiser"), "slot='optimiser' is not a slot"),
    ("slot-as-list", _technique(slot=["schedule"]), "is not a slot"),
    ("config-without-defaults", _technique(config_cls=_Required), "give every field a default"),
    ("config-not-technique-config", _technique(config_cls=_PlainModel), "must subclass"),
    ("config-not-a-class", _technique(config_cls={"lr": 1}), "must subclass"),
    ("not-a-technique", _NotATechnique, "not a subclass of hf_memkit.Technique"),
    ("an-instance", LoraTechnique(), "not a subclass of hf_memkit.Technique"),
    ("a-function", lambda: None, "not a subclass of hf_memkit.Technique"),
]


@pytest.mark.parametrize("cls,fragment", [b[1:] for b in BAD_CLASSES], ids=[b[0] for b in BAD_CLASSES])
def test_bad_technique_class_is_rejected(cls, fragment: str, restore_registry):
    before = dict(registry._TABLE)
    with pytest.raises(RegistryError) as info:
        registry.register_technique(cls)
    assert isinstance(info.value, ValueError)
    assert fragment in str(info.value), str(info.value)
    assert registry._TABLE == before
    # replace=True does not bypass the checks
    with pytest.raises(RegistryError):
        registry.register_technique(cls, replace=True)


# ---------------------------------------------------------------------------------------------------------
# third-party techniques through the entry-point group

PLUGIN_SOURCE = '''
from typing import ClassVar

from pydantic import Field

from hf_memkit import Technique, TechniqueConfig


class MyConfig(TechniqueConfig):
    period: int = Field(4, ge=1, description="steps between two refreshes")


class MyTechnique(Technique):
    name: ClassVar[str] = "{name}"
    slot: ClassVar[str] = "{slot}"
    config_cls = MyConfig
    summary: ClassVar[str] = "a technique from a plugin"
'''


@pytest.fixture
def fresh_registry(restore_registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """An empty, not-yet-loaded registry that sees the fake distributions written into tmp_path."""
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._TABLE.clear()
    registry.PLUGIN_FAILURES.clear()
    registry._loaded = False
    modules_before = set(sys.modules)
    yield tmp_path
    for mod in set(sys.modules) - modules_before:
        if mod.startswith("fake_memkit_"):
            del sys.modules[mod]


def _install(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n", encoding="utf-8")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}\n", encoding="utf-8")
    for mod, source in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(source), encoding="utf-8")


def test_plugin_technique_is_registered(fresh_registry: Path):
    _install(
        fresh_registry, "fakeplugin", {"fake_plugin_tech": "fake_memkit_plugin:MyTechnique"},
        {"fake_memkit_plugin": PLUGIN_SOURCE.format(name="fake_plugin_tech", slot="schedule")},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a working plugin loads without a warning
        entry = registry.get("fake_plugin_tech")
    assert entry is not None
    assert entry.slot == "schedule"
    assert entry.technique_cls.__module__ == "fake_memkit_plugin"
    assert "entry point" in entry.origin and "fakeplugin" in entry.origin
    assert registry.PLUGIN_FAILURES == {}
    # the built-ins are loaded as well
    assert registry.get("lora").origin == "builtin" and registry.get("adamw").origin == "builtin"
    # usable in a recipe, with its settings validated
    recipe = load_recipe("memkit: 1\noptimizer: adamw\nschedule:\n  - fake_plugin_tech: {period: 8}\n")
    assert recipe.names() == ["adamw", "fake_plugin_tech"]
    built = recipe.build()[1]
    assert isinstance(built, entry.technique_cls) and built.config.period == 8
    with pytest.raises(RecipeError) as info:
        load_recipe({"schedule": [{"fake_plugin_tech": {"periode": 8}}]})
    assert info.value.key == "schedule[0].fake_plugin_tech.periode"
    assert "did you mean 'period'" in str(info.value)


def test_broken_plugin_warns_and_is_reported(fresh_registry: Path):
    _install(
        fresh_registry, "brokenplugin", {"fake_broken_tech": "fake_memkit_broken:MyTechnique"},
        {"fake_memkit_broken": "raise ImportError('needs libfoo, which is not installed')\n"},
    )
    with pytest.warns(UserWarning, match="fake_broken_tech") as record:
        names = registry.names()
    message = str(record[0].message)
    assert "brokenplugin" in message and "needs libfoo" in message and "failed to import" in message
    # the other techniques still load
    assert {"adamw", "adamw_8bit", "lora", "qlora"} <= set(names)
    assert "fake_broken_tech" not in names
    failure = registry.PLUGIN_FAILURES["fake_broken_tech"]
    assert "fake_memkit_broken:MyTechnique" in failure and "ImportError" in failure and "needs libfoo" in failure
    # a recipe naming it says why it is missing
    with pytest.raises(RecipeError) as info:
        load_recipe({"schedule": [{"fake_broken_tech": {}}]})
    text = str(info.value)
    assert info.value.key == "schedule[0].fake_broken_tech"
    assert "unknown technique 'fake_broken_tech'" in text
    assert "a plugin registers 'fake_broken_tech' but failed to import" in text
    assert "needs libfoo" in text


def test_plugin_duplicating_a_builtin_is_an_error(fresh_registry: Path):
    _install(
        fresh_registry, "dupplugin", {"adamw": "fake_memkit_dup:MyTechnique"},
        {"fake_memkit_dup": PLUGIN_SOURCE.format(name="adamw", slot="optimizer")},
    )
    with pytest.raises(RegistryError) as info:
        registry.get("adamw")
    text = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'adamw' is already registered by hf_memkit.optim.adamw.technique.AdamWTechnique (builtin)" in text
    assert "fake_memkit_dup.MyTechnique (entry point of dupplugin)" in text
    assert registry._loading is False  # a failed load can be retried, it does not leave the table locked
    assert registry._TABLE[("optimizer", "adamw")].technique_cls is AdamWTechnique


def test_plugin_state_is_restored_after_plugin_tests():
    # runs after the plugin tests (file order): the fixture put the real table back
    assert registry.get("fake_plugin_tech") is None
    assert "fake_broken_tech" not in registry.PLUGIN_FAILURES
    assert registry.get("adamw").technique_cls is AdamWTechnique
