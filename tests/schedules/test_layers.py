"""Finding decoder layers and the always-trained roles, on Llama and GPT-2 (real and meta-device models)."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.errors import IncompatibleModelError
from hf_memkit.schedules.layers import find_decoder_layers, resolve_always_train, role_parameters
from tests.schedules.conftest import six_layer_model


def test_llama_layers_and_roles():
    model = six_layer_model()
    layers = find_decoder_layers(model)
    assert layers.path == "model.layers" and len(layers) == 6
    assert layers.layer_of["model.layers.3.mlp.down_proj.weight"] == 3
    assert role_parameters(model, layers, "embeddings") == {"model.embed_tokens.weight"}
    assert role_parameters(model, layers, "lm_head") == {"lm_head.weight"}
    assert role_parameters(model, layers, "final_norm") == {"model.norm.weight"}
    names = resolve_always_train(model, layers, ["lm_head", "model.layers.*.input_layernorm.weight"], "k")
    assert len(names) == 7 and "lm_head.weight" in names


def test_gpt2_layers_and_roles_on_the_meta_device():
    from transformers import AutoModelForCausalLM, GPT2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64))
    layers = find_decoder_layers(model)
    assert layers.path == "transformer.h" and len(layers) == 3
    assert role_parameters(model, layers, "embeddings") == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert role_parameters(model, layers, "lm_head") == {"transformer.wte.weight"}  # tied: one tensor
    assert role_parameters(model, layers, "final_norm") == {"transformer.ln_f.weight", "transformer.ln_f.bias"}


def test_bad_layers_attribute_and_pattern_are_typed_errors():
    model = six_layer_model(layers=2)
    with pytest.raises(IncompatibleModelError, match="layers_attribute 'model.norm'"):
        find_decoder_layers(model, "model.norm")
    layers = find_decoder_layers(model)
    with pytest.raises(IncompatibleModelError, match="'embed_token' is neither a role"):
        resolve_always_train(model, layers, ["embed_token"], "schedule.lisa")
