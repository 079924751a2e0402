"""The model side: which tensors go to 16 bits, the forward equals an fp32 model with the rounded weights, tied
weights stay tied, remove() restores dtypes, models loaded in bf16 and PEFT adapters."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_memkit.precision.bf16.config import Bf16Config
from hf_memkit.precision.bf16.technique import Bf16Technique

from .conftest import bf16_representable_


def _ids(vocab=512, shape=(2, 12), seed=0):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _fp32_twin(model):
    """A plain fp32 copy of a patched model (values widened), built without the patch."""
    import copy

    twin = copy.deepcopy(model)
    for m in twin.modules():
        vars(m).pop("forward", None)
    twin.float()
    return twin


def test_linear_and_embedding_weights_go_to_bf16_the_rest_stays_fp32(tiny_model):
    handle = Bf16Technique().patch_model(tiny_model)
    for name, p in tiny_model.named_parameters():
        want = torch.bfloat16 if name.endswith("proj.weight") or "embed_tokens" in name or "lm_head" in name \
            else torch.float32
        assert p.dtype == want, name
    handle.remove()
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())


def test_forward_and_gradients_equal_the_fp32_model_with_rounded_weights(tiny_model):
    Bf16Technique().patch_model(tiny_model)
    twin = _fp32_twin(tiny_model)
    ids = _ids()
    out = tiny_model(input_ids=ids, labels=ids)
    ref = twin(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for (n, p), (_, q) in zip(tiny_model.named_parameters(), twin.named_parameters()):
        assert p.grad.dtype == p.dtype
        tol = 1e-5 if p.dtype == torch.float32 else 2**-7
        torch.testing.assert_close(p.grad.float(), q.grad, rtol=tol, atol=1e-6, msg=n)


def test_tied_weights_stay_tied_and_are_stored_once(tied_model):
    t = Bf16Technique()
    t.patch_model(tied_model)
    emb, head = tied_model.get_input_embeddings().weight, tied_model.get_output_embeddings().weight
    assert emb is head and emb.dtype == torch.bfloat16
    report = t._patch.report
    assert report.stored.count("model.embed_tokens.weight") + report.stored.count("lm_head.weight") == 1
    ids = _ids()
    tied_model(input_ids=ids, labels=ids).loss.backward()
    assert emb.grad is not None and emb.grad.dtype == torch.bfloat16


def test_remove_is_exact_for_representable_weights_and_logs_rounding(tiny_model, caplog):
    bf16_representable_(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="hf_memkit"):
        handle = Bf16Technique().patch_model(tiny_model)
    assert "rounded" not in caplog.text
    assert handle.remove() is tiny_model
    for k, v in tiny_model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert not [m for m in tiny_model.modules() if "forward" in vars(m)]


def test_rounding_of_fp32_weights_is_logged(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="hf_memkit"):
        Bf16Technique().patch_model(tiny_model).remove()
    assert "rounded to nearest" in caplog.text


def test_a_model_loaded_in_bf16_keeps_its_weights_and_widens_norms(tiny_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {n: p.data_ptr() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    t = Bf16Technique()
    handle = t.patch_model(model)
    assert not t._patch.report.rounded
    assert {n: p.data_ptr() for n, p in model.named_parameters() if n in weights} == weights  # no copy made
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    handle.remove()
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_through_the_functions(tiny_model, use_reentrant):
    Bf16Technique().patch_model(tiny_model)
    twin = _fp32_twin(tiny_model)
    ids = _ids()
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    tiny_model.train()
    twin.train()
    out = tiny_model(input_ids=ids, labels=ids)
    out.loss.backward()
    ref = twin(input_ids=ids, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    q = tiny_model.model.layers[0].mlp.down_proj.weight
    r = twin.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(q.grad.float(), r.grad, rtol=2**-7, atol=1e-6)


def test_skip_modules_keep_fp32(tiny_model):
    Bf16Technique(Bf16Config(skip_modules=["lm_head", "v_proj"])).patch_model(tiny_model)
    assert tiny_model.lm_head.weight.dtype == torch.float32
    assert tiny_model.model.layers[1].self_attn.v_proj.weight.dtype == torch.float32
    assert tiny_model.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_lora_adapters_stay_fp32_on_a_bf16_base(tiny_model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    Bf16Technique().patch_model(peft_model)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.requires_grad, name
        elif name.endswith("base_layer.weight") or name.endswith("proj.weight"):
            assert p.dtype == torch.bfloat16, name
    ids = _ids()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads.values())


def test_float16_storage(tiny_model):
    Bf16Technique(Bf16Config(dtype="float16")).patch_model(tiny_model)
    assert tiny_model.lm_head.weight.dtype == torch.float16
    ids = _ids()
    assert torch.isfinite(tiny_model(input_ids=ids, labels=ids).loss)


def test_a_deep_copy_computes_with_its_own_weights(tiny_model):
    import copy

    Bf16Technique().patch_model(tiny_model)
    twin = copy.deepcopy(tiny_model)
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.zero_()
    ids = _ids()
    with torch.no_grad():
        a = tiny_model(input_ids=ids).logits
        b = twin(input_ids=ids).logits
    assert not torch.allclose(a, b)
    assert twin.model.layers[0].mlp.down_proj.forward.__self__ is twin.model.layers[0].mlp.down_proj
