"""The technique × engine table is enforced when the recipe loads (and against the run's real arguments), and
every refusal says why and which engines work."""

from __future__ import annotations

import json

import pytest

from hf_memkit import load_recipe, registry
from hf_memkit.engines import ENGINES, check_engine, deepspeed_config_engine, recipe_engine
from hf_memkit.errors import RecipeError

ENGINE_RECIPES = {
    "zero1": {"training_args": {"deepspeed": {"zero_optimization": {"stage": 1}}}},
    "zero2": {"distributed": {"deepspeed": {"preset": "zero2"}}},
    "zero3": {"distributed": {"deepspeed": {"preset": "zero3_offload"}}},
    "fsdp": {"distributed": {"fsdp": {}}},
    "co2": {"distributed": {"co2": {}}},
}
CASES = [(e.slot, e.name, eng) for e in registry.entries() if e.origin == "builtin" and e.slot != "distributed"
         for eng in ENGINE_RECIPES]


def _with(slot, name, engine):
    value = {name: {}}
    return {slot: [value] if registry.SLOTS[slot] else value, **ENGINE_RECIPES[engine]}


@pytest.mark.parametrize("slot, name, engine", CASES, ids=[f"{s}.{n}-{e}" for s, n, e in CASES])
def test_every_declared_combination(slot, name, engine):
    cls = registry.get(name, slot).technique_cls
    recipe = _with(slot, name, engine)
    if engine not in cls.unsupported_engines:
        load_recipe(recipe, check_training_args=False)
        return
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, check_training_args=False)
    err = info.value
    assert f"does not support {ENGINES[engine]}" in err.problem
    assert cls.unsupported_engines[engine] in err.problem
    assert err.key == f"{slot}.{name}" and err.fix and "works with" in err.fix
    assert ENGINES[engine] not in err.fix.split(";")[0]


def test_cce_says_what_works_instead():
    with pytest.raises(RecipeError) as info:
        load_recipe({"loss": {"cce": {}}, "distributed": {"deepspeed": {"preset": "zero3"}}})
    assert "lm_head" in str(info.value) and "ZeRO-2" in info.value.fix and "DDP" in info.value.fix
    load_recipe({"loss": {"cce": {}}, "distributed": {"deepspeed": {"preset": "zero2"}}})


def test_lora_and_mixlora_support_every_engine():
    for name in ("lora", "mixlora"):
        assert not registry.get(name, "adapter").technique_cls.unsupported_engines


def test_engine_read_from_training_args_and_config_files(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert deepspeed_config_engine(str(cfg)) == "zero3"
    assert deepspeed_config_engine({"zero_optimization": {"stage": 0}}) == "ddp"
    assert recipe_engine(load_recipe({"training_args": {"fsdp": "full_shard"}}, check_training_args=False))[0] == "fsdp"
    with pytest.raises(RecipeError, match=r"ZeRO-3 \(selected by training_args.deepspeed\)"):
        load_recipe({"loss": {"cce": {}}, "training_args": {"deepspeed": str(cfg)}}, check_training_args=False)
    with pytest.raises(RecipeError, match="ZeRO-3"):
        load_recipe({"loss": {"cce": {}}, "distributed": {"deepspeed": {"config": str(cfg)}}})
    with pytest.raises(RecipeError, match="ZeRO-3"):  # overrides can change the stage too
        load_recipe({"loss": {"cce": {}}, "distributed": {"deepspeed": {
            "preset": "zero2", "overrides": {"zero_optimization": {"stage": 3}}}}})


def test_the_command_line_engine_is_checked_when_the_trainer_is_built(tiny_model, tmp_path):
    """A recipe that loads (no engine in it) is still refused when --deepspeed picks ZeRO-3 at run time."""
    from hf_memkit import MemkitTrainer
    from hf_memkit.data.recipes import configs_dir
    from tests.conftest import make_args

    args = make_args(tmp_path, deepspeed=str(configs_dir() / "zero3.json"))
    with pytest.raises(RecipeError, match="does not support ZeRO-3"):
        MemkitTrainer(model=tiny_model, args=args, recipe={"loss": {"cce": {}}})


def test_check_engine_on_classes_and_unknown_engines():
    cce = registry.get("cce", "loss").technique_cls
    check_engine([cce], "zero2")
    check_engine([cce], None)
    with pytest.raises(RecipeError, match="unknown distributed engine"):
        check_engine([cce], "zero4")


def test_one_distributed_technique_per_recipe():
    with pytest.raises(RecipeError):
        load_recipe({"distributed": {"deepspeed": {}, "fsdp": {}}})
    with pytest.raises(RecipeError, match="sets TrainingArguments.deepspeed itself"):
        load_recipe({"distributed": {"deepspeed": {}}, "training_args": {"deepspeed": "x.json"}},
                    check_training_args=False)
