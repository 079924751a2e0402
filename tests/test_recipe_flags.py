"""Techniques as command-line flags (``hf_memkit.recipe_flags``): the merge into a recipe, its errors, argv."""

from __future__ import annotations

import pytest

from hf_memkit import RecipeError, load_recipe
from hf_memkit.schedules.lisa.config import LisaConfig
from hf_memkit.recipe_flags import (
    MemkitFlags,
    apply_flags,
    parse_memkit_args,
    settings_help,
    slot_help,
    split_argv,
)

LISA_RECIPE = "memkit: 1\nschedule: [{lisa: {active_layers: 2, interval: 5}}]\noptimizer: {adamw: {lr: 1.0e-3}}\n"


def test_slot_flags_give_the_same_recipe_as_the_file():
    from_flags = apply_flags(None, {"loss": "cce", "optimizer": "adamw_8bit"})
    from_file = load_recipe("memkit: 1\nloss: {cce: {}}\noptimizer: {adamw_8bit: {}}\n")
    assert from_flags.to_dict() == from_file.to_dict()
    assert from_flags.source == "command-line flags"


def test_inline_settings_and_list_forms():
    r = apply_flags(None, {"optimizer": "fira: {rank: 64}"})
    assert r.get("fira").config.rank == 64
    for text in ("mesa", "[{mesa: {bits: 8}}]", "mesa: {bits: 8}", "[mesa]"):
        assert apply_flags(None, {"activations": text}).names() == ["mesa"]
    assert apply_flags(None, {"activations": "[{mesa: {bits: 8}}]"}).get("mesa").config.bits == 8
    assert apply_flags(None, {"activations": "mesa, offload"}).names() == ["mesa", "offload"]


def test_a_slot_flag_replaces_the_recipes_technique_and_none_drops_it():
    recipe = load_recipe(LISA_RECIPE)
    r = apply_flags(recipe, {"optimizer": "adamw_8bit"})
    assert [t.name for t in r.slot("optimizer")] == ["adamw_8bit"]
    assert r.get("lisa").config.interval == 5  # the other slots are the recipe's
    assert r.source.endswith("+ command-line flags")
    assert apply_flags(recipe, {"schedule": "none"}).names() == ["adamw"]
    assert apply_flags(recipe, {}) is recipe  # no flag: the recipe as it is


def test_a_setting_changes_one_setting_of_a_selected_technique():
    recipe = load_recipe(LISA_RECIPE)
    r = apply_flags(recipe, settings=["lisa.active_layers=1"])
    assert (r.get("lisa").config.active_layers, r.get("lisa").config.interval) == (1, 5)
    r = apply_flags(recipe, MemkitFlags({"schedule": "lisa: {active_layers: 3}"}, ["lisa.interval=3"]))
    assert r.get("lisa").config.model_dump() == {**LisaConfig().model_dump(), "active_layers": 3, "interval": 3}
    r = apply_flags(recipe, settings=["schedule.lisa.always_train=[lm_head]", "adamw.betas=[0.8, 0.9]"])
    assert r.get("lisa").config.always_train == ["lm_head"] and r.get("adamw").config.betas == (0.8, 0.9)
    r = apply_flags(recipe, settings=["lisa.interval=7", "lisa.interval=8"])  # the later one wins
    assert r.get("lisa").config.interval == 8


def test_nested_and_export_settings():
    r = apply_flags(None, {"schedule": "sparse_update"}, settings=["sparse_update.budget.mb=8"])
    assert r.get("sparse_update").config.budget.mb == 8
    r = apply_flags(None, {"compress": "rtn"}, settings=["export.dir=out/q", "rtn.bits=8"])
    assert r.export.dir == "out/q" and r.get("rtn").config.bits == 8


@pytest.mark.parametrize("slots, settings, where, words", [
    ({"loss": "ccee"}, [], "--memkit_loss", ["unknown technique 'ccee'", "did you mean 'cce'?"]),
    ({"optimizer": "fira: {rnk: 64}"}, [], "--memkit_optimizer", ["unknown setting 'rnk'", "did you mean 'rank'?"]),
    ({"optimizer": "lisa"}, [], "--memkit_optimizer", ["'lisa' is a 'schedule' technique", "move it under"]),
    ({"loss": "cce,cce"}, [], "--memkit_loss", ["takes one technique"]),
    ({"schedule": "lisa"}, ["lisa.active_layer=2"], "--memkit.lisa.active_layer",
     ["unknown setting 'active_layer'", "did you mean 'active_layers'?"]),
    ({}, ["lisa.active_layers=2"], "--memkit.lisa.active_layers",
     ["'lisa' is not in this run", "--memkit_schedule lisa"]),
    ({}, ["lsia.active_layers=2"], "--memkit.lsia.active_layers", ["unknown technique 'lsia'", "did you mean 'lisa'?"]),
    ({"schedule": "lisa"}, ["lisa.active_layers=-3"], "--memkit.lisa.active_layers",
     ["invalid value -3", "greater than or equal to 1"]),
    ({"schedule": "lisa"}, ["lisa.active_layers=\"2\""], "--memkit.lisa.active_layers", ["invalid value '2'"]),
    ({}, ["lisa"], "--memkit_set", ["not TECHNIQUE.SETTING=VALUE"]),
    ({}, ["lisa=2"], "--memkit_set", ["is not TECHNIQUE.SETTING"]),
    ({"lossy": "cce"}, [], "--memkit_lossy", ["there is no slot 'lossy'", "did you mean 'loss'?"]),
])
def test_flag_errors_name_the_flag_and_the_fix(slots, settings, where, words):
    with pytest.raises(RecipeError) as err:
        apply_flags(None, slots, settings=settings)
    text = str(err.value)
    assert text.startswith(where), text
    assert all(w in text for w in words), text


def test_the_merged_recipe_meets_the_compatibility_rules():
    with pytest.raises(RecipeError, match="'lisa' cannot be combined with 'slot:adapter'") as err:
        apply_flags(load_recipe(LISA_RECIPE), {"adapter": "lora"})
    assert "command-line flags" in str(err.value)


def test_split_argv_takes_every_form_and_leaves_the_rest():
    argv = ["--a", "1", "--memkit_loss", "cce", "--memkit-optimizer=adamw_8bit", "--memkit.lisa.active_layers", "4",
            "--memkit.lisa.interval=3", "--memkit_set", "x.y=1", "z.w=[1, 2]", "--memkit_recipe", "r.yaml",
            "--memkit_recipe_extra", "1", "--seed", "-1", "--memkit_schedule", "lisa", "--memkit.lisa.seed", "-2"]
    flags, rest = split_argv(argv)
    assert flags.slots == {"loss": "cce", "optimizer": "adamw_8bit", "schedule": "lisa"}
    assert flags.settings == ["lisa.active_layers=4", "lisa.interval=3", "x.y=1", "z.w=[1, 2]", "lisa.seed=-2"]
    assert rest == ["--a", "1", "--memkit_recipe", "r.yaml", "--memkit_recipe_extra", "1", "--seed", "-1"]


@pytest.mark.parametrize("argv, words", [
    (["--memkit_loss"], ["--memkit_loss needs a value"]),
    (["--memkit.lisa.interval"], ["needs a value"]),
    (["--memkit.lisa.interval", "--seed", "1"], ["--memkit.lisa.interval needs a value"]),
    (["--memkit_set", "--b"], ["needs TECHNIQUE.SETTING=VALUE"]),
    (["--memkit_los", "cce"], ["unknown flag --memkit_los", "did you mean --memkit_loss?"]),
])
def test_split_argv_errors(argv, words):
    with pytest.raises(RecipeError) as err:
        split_argv(argv)
    assert all(w in str(err.value) for w in words)


def test_parse_memkit_args_rewrites_the_dotted_form_for_hfargumentparser():
    argv = ["--memkit.lisa.active_layers", "4", "--x", "1", "--memkit_set", "lisa.interval=3", "--memkit_schedule",
            "lisa"]
    assert parse_memkit_args(argv) == ["--x", "1", "--memkit_schedule", "lisa", "--memkit_set",
                                       "lisa.active_layers=4", "lisa.interval=3"]


def test_help_texts_list_the_registry_including_techniques_registered_later():
    from hf_memkit import registry
    from hf_memkit.technique import Technique, TechniqueConfig

    assert "Registered: cce" in slot_help("loss")
    assert all(n in slot_help("optimizer") for n in registry.names("optimizer"))
    text = settings_help()
    assert "lisa: active_layers, interval" in text and "adapter.lorc:" in text and "compress.lorc:" in text

    class Cfg(TechniqueConfig):
        depth: int = 1

    class Late(Technique):
        name, slot, config_cls = "late_schedule_for_help", "schedule", Cfg

    registry.register_technique(Late)
    try:
        assert "late_schedule_for_help" in slot_help("schedule")
        assert "late_schedule_for_help: depth" in settings_help()
    finally:
        registry.unregister_technique("late_schedule_for_help", "schedule")
