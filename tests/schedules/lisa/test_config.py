"""LISA's recipe surface: defaults, YAML round trip, declared conflicts and early typed errors."""

from __future__ import annotations

import pytest

from hf_memkit import RecipeError, load_recipe
from hf_memkit.schedules.lisa.config import LisaConfig
from hf_memkit.technique import ValidationContext
from tests.schedules.conftest import six_layer_model


def test_defaults_and_round_trip():
    recipe = load_recipe({"schedule": [{"lisa": {}}]})
    cfg = recipe.get("lisa").config
    assert isinstance(cfg, LisaConfig)
    assert (cfg.active_layers, cfg.interval, cfg.always_train) == (2, 20, ["embeddings", "lm_head", "final_norm"])
    assert load_recipe(recipe.to_yaml()).to_dict() == recipe.to_dict()


@pytest.mark.parametrize("other, word", [
    ({"adapter": {"lora": {}}}, "adapter"),
    ({"schedule": [{"lisa": {}}, {"sparse_update": {}}]}, "sparse_update"),
    ({"training_args": {"deepspeed": "configs/zero3.json"}}, "deepspeed"),
    ({"training_args": {"fsdp": "full_shard"}}, "fsdp"),
])
def test_unsupported_combinations_are_rejected_at_load(other, word):
    recipe = {"schedule": [{"lisa": {"active_layers": 1}}], **other}
    with pytest.raises(RecipeError, match=word) as info:
        load_recipe(recipe, check_training_args=False)
    # technique conflicts say which to remove; engines (the compatibility table) say which engines work
    assert info.value.fix and ("remove one of" in info.value.fix or "works with" in info.value.fix)


def test_bad_values_name_the_key():
    with pytest.raises(RecipeError) as info:
        load_recipe({"schedule": [{"lisa": {"active_layers": 0}}]})
    assert info.value.key == "schedule[0].lisa.active_layers"
    with pytest.raises(RecipeError, match="did you mean 'interval'"):
        load_recipe({"schedule": [{"lisa": {"intervall": 3}}]})


def test_more_active_layers_than_the_model_has_is_an_error():
    recipe = load_recipe({"schedule": [{"lisa": {"active_layers": 7}}]})
    technique = recipe.build()[0]
    with pytest.raises(RecipeError, match="only 6 decoder layers") as info:
        technique.validate(ValidationContext(recipe, six_layer_model().config))
    assert info.value.key == "schedule.lisa.active_layers"
