"""sparse_update's recipe surface: defaults, round trip, consistency checks, conflicts."""

from __future__ import annotations

import pytest

from hf_memkit import RecipeError, load_recipe
from hf_memkit.technique import ValidationContext
from tests.schedules.conftest import six_layer_model


def test_defaults_and_round_trip():
    recipe = load_recipe({"schedule": [{"sparse_update": {}}]})
    cfg = recipe.get("sparse_update").config
    assert (cfg.num_bias_layers(), cfg.layers(), cfg.ratios()) == (2, [-1], [0.25])
    assert load_recipe(recipe.to_yaml()).to_dict() == recipe.to_dict()
    budget = load_recipe({"schedule": [{"sparse_update": {"budget": {"mb": 4}}}]})
    assert load_recipe(budget.to_yaml()).to_dict() == budget.to_dict()


@pytest.mark.parametrize("params, match", [
    ({"weight_layers": [-1, -2], "weight_ratio": [0.5]}, "one ratio per layer"),
    ({"weight_ratio": 1.5}, r"\(0, 1\]"),
    ({"weight_layers": [3, 3]}, "twice"),
    ({"budget": {"mb": 1}, "bias_layers": 3}, "budget chooses bias_layers"),
    ({"budget": {"mb": 1, "ratios": [2]}}, r"\[0, 1\]"),
    ({"quantized": "int4"}, "int8"),
])
def test_inconsistent_settings_are_recipe_errors(params, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe({"schedule": [{"sparse_update": params}]})


@pytest.mark.parametrize("other", [{"adapter": {"lora": {}}}, {"schedule": [{"sparse_update": {}}, {"lisa": {}}]}])
def test_conflicts(other):
    recipe = {"schedule": [{"sparse_update": {}}], **other}
    with pytest.raises(RecipeError, match="cannot be combined"):
        load_recipe(recipe)


def test_layers_outside_the_model_are_rejected_before_training():
    recipe = load_recipe({"schedule": [{"sparse_update": {"weight_layers": [6]}}]})
    with pytest.raises(RecipeError, match="outside the model's 6 decoder layers") as info:
        recipe.build()[0].validate(ValidationContext(recipe, six_layer_model().config))
    assert info.value.key == "schedule.sparse_update.weight_layers"
