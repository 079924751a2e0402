"""The compress plan reads what each technique can do from its class, never from a table of names: a technique
registered from outside joins the plan by its declared capabilities."""

from __future__ import annotations

from typing import ClassVar

import pytest

from hf_memkit import load_recipe, registry
from hf_memkit.compress.capabilities import PRUNER, QUANTIZER, capability, names_with
from hf_memkit.compress.plan import Plan
from hf_memkit.errors import RecipeError
from hf_memkit.prune.base import PruneTechnique
from hf_memkit.prune.magnitude_24.config import Magnitude24Config


@pytest.fixture
def my_pruner():
    class My24Technique(PruneTechnique):
        name: ClassVar[str] = "my_24"
        config_cls = Magnitude24Config
        leaves_nm: ClassVar[bool] = True
        summary: ClassVar[str] = "a third-party 2:4 pruner (test)"

    registry.register_technique(My24Technique, origin="test")
    try:
        yield My24Technique
    finally:
        registry.unregister_technique("my_24", "compress")


def test_builtin_capabilities_are_class_attributes():
    assert names_with(QUANTIZER) == ["block_ap", "gptq", "rtn"]
    assert [n for n in names_with(PRUNER) if capability(n, "leaves_nm")] == ["magnitude_24", "wanda_24"]
    assert [n for n in names_with(PRUNER) if capability(n, "rebuilds_modules")] == ["comp", "l1_structured"]
    assert [n for n in names_with(QUANTIZER) if capability(n, "keeps_nm")] == ["rtn"]
    assert {n for n in registry.names("compress") if capability(n, "calibrated")} == {"block_ap", "gptq", "wanda_24",
                                                                                       "comp"}


def test_a_new_pruner_joins_the_plan_by_its_capabilities(my_pruner):
    plan = Plan.from_recipe(load_recipe({"memkit": 1, "compress": [{"my_24": {}}, {"rtn": {}}]}))
    assert plan.pruners[0][0] == "my_24" and plan.quantizer[0] == "rtn" and plan.leader == "rtn"
    assert not plan.rebuilds_modules
    # a 2:4 pruner followed by a quantizer that moves pruned weights: refused at load, the fix names rtn
    with pytest.raises(RecipeError, match=r"(?s)gptq updates the weights my_24 pruned.*use rtn after a 2:4 pruner"):
        load_recipe({"memkit": 1, "compress": [{"my_24": {}}, {"gptq": {}}]})
