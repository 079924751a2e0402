"""One config per PEFT adapter type: the PEFT config classes are generated from the recipe configs."""

from __future__ import annotations

import dataclasses
import json

import pytest

import hf_memkit
from hf_memkit.adapters.lorc.config import LorcAdapterConfig
from hf_memkit.adapters.mixlora.config import MixLoraFields
from hf_memkit.errors import RecipeError


@pytest.mark.parametrize("peft_cls, fields_cls, renames", [
    ("MixLoraConfig", MixLoraFields, {}), ("LorcConfig", LorcAdapterConfig, {"rank": "r"})])
def test_every_recipe_field_is_a_peft_field_with_the_same_default_and_help(peft_cls, fields_cls, renames):
    cls = getattr(hf_memkit, peft_cls)
    peft_fields = {f.name: f for f in dataclasses.fields(cls)}
    default = cls()
    for name, info in fields_cls.model_fields.items():
        f = peft_fields[renames.get(name, name)]
        assert f.metadata["help"] == info.description
        if name != "lora_alpha" or peft_cls != "LorcConfig":  # LoRC: None means "= r", resolved on creation
            assert getattr(default, f.name) == info.get_default(call_default_factory=True), name


def test_the_same_validation_in_python_as_in_a_recipe():
    with pytest.raises(RecipeError, match=r"LorcConfig: at 'r': Input should be greater than or equal to 1"):
        hf_memkit.LorcConfig(r=0)
    with pytest.raises(RecipeError, match=r"at 'top_k': top_k \(3\) cannot exceed num_experts \(2\)"):
        hf_memkit.MixLoraConfig(num_experts=2, top_k=3)
    with pytest.raises(RecipeError, match="bias='none'"):
        hf_memkit.MixLoraConfig(bias="all")


def test_a_saved_config_round_trips(tmp_path):
    from peft import PeftConfig

    cfg = hf_memkit.LorcConfig(task_type="CAUSAL_LM", r=4, bits=3, target_modules=["q_proj", "v_proj"])
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORC" and saved["r"] == 4 and saved["lora_alpha"] == 4
    back = PeftConfig.from_pretrained(tmp_path)
    assert type(back) is hf_memkit.LorcConfig and back.bits == 3 and back.target_modules == {"q_proj", "v_proj"}
    saved["bits"] = 5  # a hand-edited file gets the recipe's error
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(RecipeError, match="at 'bits'"):
        PeftConfig.from_pretrained(tmp_path)
