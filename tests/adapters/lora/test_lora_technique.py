from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_memkit import IncompatibleModelError, RecipeError, load_recipe
from hf_memkit.adapters.lora.config import LoraConfigFields
from hf_memkit.adapters.lora.technique import LoraTechnique
from hf_memkit.technique import ValidationContext


def test_every_exposed_field_is_a_peft_loraconfig_field():
    from peft import LoraConfig

    peft_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert set(LoraConfigFields.model_fields) <= peft_fields


def test_starts_at_the_base_model_and_trains_only_adapters(tiny_model):
    x = torch.randint(0, 500, (2, 12))
    linears = [m for n, m in tiny_model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    with torch.no_grad():
        base = tiny_model(input_ids=x).logits
    handle = LoraTechnique(LoraConfigFields(r=4)).patch_model(tiny_model)
    with torch.no_grad():
        patched = handle.model(input_ids=x).logits
    torch.testing.assert_close(patched, base)  # B = 0 at init
    trainable = {n: p for n, p in handle.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear = every Linear but the output head: r * (in + out) parameters each
    expected = sum(4 * (m.in_features + m.out_features) for m in linears)
    assert sum(p.numel() for p in trainable.values()) == expected


def test_update_matches_plain_pytorch_lora_formula(tiny_model):
    cfg = LoraConfigFields(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"])
    handle = LoraTechnique(cfg).patch_model(tiny_model)
    layer = handle.model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, layer.in_features)
    w = layer.base_layer.weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    reference = x @ w.T + (8 / 4) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), reference)


def test_estimate_counts_adapter_bytes_exactly(tiny_model):
    from hf_memkit.memory.estimate import estimate_memory

    handle = LoraTechnique(LoraConfigFields(r=8)).patch_model(tiny_model)
    measured = sum(p.numel() * 4 for p in handle.model.parameters() if p.requires_grad)
    est = estimate_memory(tiny_model.config, {"adapter": {"lora": {"r": 8}}, "optimizer": {"adamw": {}}})
    cats = est.categories()
    assert cats["adapter_weights"] == measured
    assert cats["gradients"] == measured


def test_missing_target_modules_is_a_clear_error(tiny_model):
    t = LoraTechnique(LoraConfigFields(target_modules=["c_attn"]))
    with pytest.raises(IncompatibleModelError, match="target_modules"):
        t.patch_model(tiny_model)
    assert not any(p for n, p in tiny_model.named_parameters() if "lora" in n)


def test_settings_peft_rejects_are_recipe_errors():
    recipe = load_recipe({"adapter": {"lora": {"target_modules": "q_proj", "layers_to_transform": [0]}}})
    with pytest.raises(RecipeError, match="adapter.lora"):
        recipe.build()[0].validate(ValidationContext(recipe))


def test_refuses_to_stack_on_an_existing_peft_model(tiny_model):
    handle = LoraTechnique().patch_model(tiny_model)
    with pytest.raises(IncompatibleModelError, match="already carries a PEFT adapter"):
        LoraTechnique().patch_model(handle.model)
