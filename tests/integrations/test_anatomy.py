"""Finding decoder layers and the always-trained roles, on Llama and GPT-2 (real and meta-device models)."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.errors import IncompatibleModelError
from hf_memkit.integrations.anatomy import find_decoder_layers, resolve_always_train, role_parameters
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


# --- the one anatomy and the one target matcher (composition issue, item 2) ----------------------------------

from hf_memkit.integrations.anatomy import anatomy, target_linears  # noqa: E402


def _meta(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_anatomy_per_family_llama_gpt2_opt():
    from transformers import GPT2Config, OPTConfig

    llama = anatomy(six_layer_model(layers=2))
    assert (llama.family, llama.attention, llama.mlp, llama.head) == ("llama", "self_attn", "mlp", "lm_head")
    assert [n for n, _ in llama.block_linears(1, "attention")] == [
        f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
    assert [n.rsplit(".", 1)[-1] for n, _ in llama.block_linears(0, "mlp")] == ["gate_proj", "up_proj", "down_proj"]
    assert llama.embeddings == ["model.embed_tokens"] and llama.final_norm == ["model.norm"]

    gpt2_model = _meta(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    gpt2 = anatomy(gpt2_model)
    assert (gpt2.layers.path, gpt2.attention, gpt2.mlp) == ("transformer.h", "attn", "mlp")
    assert [n for n, _ in gpt2.block_linears(0)] == [f"transformer.h.0.{x}" for x in
                                                     ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert gpt2.role_parameters(gpt2_model, "lm_head") == {"transformer.wte.weight"}  # tied: one name

    opt = anatomy(_meta(OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                  vocab_size=64, word_embed_proj_dim=32)))
    assert opt.layers.path == "model.decoder.layers" and opt.mlp is None  # fc1/fc2 sit in the layer itself
    assert [n.rsplit(".", 1)[-1] for n, _ in opt.block_linears(0, "mlp")] == ["fc1", "fc2"]
    assert len(opt.block_linears(0, "attention")) == 4


def test_anatomy_of_a_peft_model_keeps_the_prefix_and_sees_through_the_adapter():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(six_layer_model(layers=2), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    body = anatomy(peft_model)
    assert body.layers.path == "base_model.model.model.layers" and body.head == "base_model.model.lm_head"
    names = [n for n, _ in body.block_linears(0, "attention")]
    assert names == [f"base_model.model.model.layers.0.self_attn.{p}_proj" for p in "qkvo"]  # wrapper = layer


def test_an_unknown_architecture_names_what_was_not_found():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(IncompatibleModelError, match=r"k: cannot find the decoder layers of Sequential.*"
                                                     r"model\.layers, transformer\.h.*layers_attribute"):
        anatomy(net, key="k")


def test_target_linears_select_what_peft_selects():
    """The plain reference is PEFT itself: the modules get_peft_model wraps are the ones the matcher picks."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    cases = [["q_proj", "down_proj"], r".*\.mlp\.(up|down)_proj", ["model.layers.1.self_attn.k_proj"],
             "all-linear"]
    for target in cases:
        model = six_layer_model(layers=2)
        ours = {n for n, _ in target_linears(model, target, key="k")}
        wrapped = get_peft_model(six_layer_model(layers=2), LoraConfig(r=2, target_modules=target))
        theirs = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)}
        assert ours == theirs, target
    model = six_layer_model(layers=2)
    picked = {n for n, _ in target_linears(model, ["q_proj", "v_proj"], key="k", layers_to_transform=[0],
                                           exclude=["model.layers.0.self_attn.v_proj"])}
    assert picked == {"model.layers.0.self_attn.q_proj"}


def test_target_linears_in_a_peft_model_reach_the_adapter_linears():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(six_layer_model(layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    trainable = {n for n, _ in target_linears(model, ["q_proj"], key="k", trainable_only=True)}
    assert trainable == {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{s}.default"
                         for i in range(2) for s in "AB"}
    with pytest.raises(IncompatibleModelError, match="selects no trainable"):
        target_linears(model, ["k_proj"], key="k", trainable_only=True)  # frozen base: a clear error
