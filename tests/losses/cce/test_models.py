"""loss.cce on tiny random models: the loss and every parameter gradient equal the model's own path."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_memkit.errors import IncompatibleModelError
from hf_memkit.losses.cce.config import CCEConfig
from hf_memkit.losses.cce.technique import CCETechnique

VOCAB = 997  # odd, and large next to the hidden size, as for the models this technique is for


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # a low cap so that tanh bends the logits of a random model; Gemma 2 ties its embeddings
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, final_logit_softcapping=0.5, attn_implementation="eager"))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _lora_with_head():
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B is random too, so the adapter branch of lm_head changes the loss
    return get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                               target_modules=["q_proj", "v_proj", "lm_head"]))


MODELS = {"llama": _llama, "qwen2": _qwen2, "gemma2_softcap": _gemma2, "gpt2": _gpt2,
          "llama_tied": lambda: _llama(tie_word_embeddings=True), "peft_lora_lm_head": _lora_with_head}


def _batch(seed=0, batch=2, length=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    labels[1, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_every_gradient_equal_the_models_own(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    ref = copy.deepcopy(model)
    batch = _batch()

    ref_out = ref(**batch)
    ref_out.loss.backward()
    technique = CCETechnique(CCEConfig())
    handle = technique.patch_model(model)
    loss, outputs = technique.loss(handle.model, batch, return_outputs=True)
    loss.backward()
    assert outputs.logits is None, "training computes no logits"
    torch.testing.assert_close(loss, ref_out.loss, rtol=1e-5, atol=0)
    ours, theirs = _grads(model), _grads(ref)
    assert ours.keys() == theirs.keys() and ours
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-7, msg=n)
    assert handle.remove() is model
    assert "forward" not in vars(model if name != "peft_lora_lm_head" else model.get_base_model())


def test_softcap_matters_in_the_gemma2_check():
    model = _gemma2()
    batch = _batch()
    capped = model(**batch).loss
    model.config.final_logit_softcapping = None
    assert not torch.isclose(capped, model(**batch).loss)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_num_items_in_batch_has_hf_semantics(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    batch = _batch(1)
    expected = model(**batch, num_items_in_batch=torch.tensor(100)).loss
    technique = CCETechnique(CCEConfig())
    technique.patch_model(model)
    got = technique.loss(model, batch, num_items_in_batch=torch.tensor(100))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_shift_labels_from_a_padding_free_collator():
    torch.manual_seed(0)
    model = _llama()
    batch = _batch(2)
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    shifted[0, 3:9] = -100  # they win over labels, as in the models' own loss
    inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "shift_labels": shifted}
    expected = model(**inputs).loss
    technique = CCETechnique(CCEConfig())
    technique.patch_model(model)
    torch.testing.assert_close(technique.loss(model, inputs), expected, rtol=1e-5, atol=0)


def test_no_saved_tensor_has_tokens_times_vocab_elements():
    torch.manual_seed(0)
    model = _llama()
    batch = _batch(length=40)
    tokens = batch["input_ids"].numel()
    technique = CCETechnique(CCEConfig())
    technique.patch_model(model)
    biggest = []

    def pack(t):
        biggest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = technique.loss(model, batch)
    loss.backward()
    assert biggest and max(biggest) < tokens * VOCAB

    # the plain model does save a tokens x vocabulary tensor (the check can see one)
    plain, seen = _llama(), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.numel()) or t, lambda t: t):
        plain(**batch).loss.backward()
    assert max(seen) >= tokens * VOCAB


def test_eval_reports_the_loss_and_logits_only_when_asked():
    torch.manual_seed(0)
    model = _gemma2()
    ref = copy.deepcopy(model).eval()
    batch = _batch()
    technique = CCETechnique(CCEConfig())
    technique.patch_model(model)
    model.eval()
    with torch.no_grad():
        expected = ref(**batch)
        direct = model(**batch)  # a direct eval-mode call gets logits, as from the model itself
        via_hook = technique.loss(model, batch, return_outputs=True)[1]  # outside a Trainer: logits too
        skipped = technique.loss(model, {**batch, "skip_logits": True}, return_outputs=True)[1]
    torch.testing.assert_close(direct.loss, expected.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(direct.logits, expected.logits)
    torch.testing.assert_close(via_hook.logits, expected.logits)
    assert skipped.logits is None and torch.isclose(skipped.loss, expected.loss)
    never = CCETechnique(CCEConfig(eval_logits="never"))
    never._patch = technique._patch
    with torch.no_grad():
        assert never.loss(model, batch, return_outputs=True)[1].logits is None


def test_generation_path_without_labels_is_untouched():
    torch.manual_seed(0)
    model = _llama()
    ref = copy.deepcopy(model)
    CCETechnique(CCEConfig()).patch_model(model)
    ids = _batch()["input_ids"]
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    out = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(out, ref.generate(ids[:, :4], max_new_tokens=3, do_sample=False))


def test_model_without_lm_head_is_refused():
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    for model in (LlamaModel(cfg), LlamaForSequenceClassification(cfg)):
        with pytest.raises(IncompatibleModelError, match="lm_head|output embedding"):
            CCETechnique(CCEConfig()).patch_model(model)


def test_unknown_logit_transform_is_refused_by_validate_and_patch():
    from hf_memkit import load_recipe
    from hf_memkit.integrations.trainer import RecipeRuntime

    model = _llama()
    model.config.logits_scaling = 4.0  # a Granite-style attribute on a family that is not in the table
    runtime = RecipeRuntime(load_recipe({"loss": {"cce": {}}}))
    with pytest.raises(IncompatibleModelError, match="logits_scaling"):
        runtime.validate(model, {})
    with pytest.raises(IncompatibleModelError, match="logits_scaling"):
        CCETechnique(CCEConfig()).patch_model(model)
    assert "forward" not in vars(model)


def test_a_silent_logit_transform_is_caught_by_the_probe():
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):  # transforms its logits with no config attribute to tell
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model = ScaledLlama(_llama().config)
    with pytest.raises(IncompatibleModelError, match="differ from"):
        CCETechnique(CCEConfig()).patch_model(model)
    assert "forward" not in vars(model) and "_memkit_loss_patch" not in vars(model)
    CCETechnique(CCEConfig(verify_head=False)).patch_model(model)  # the user's explicit choice


def test_prompt_learning_adapters_are_refused():
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(IncompatibleModelError, match="prompt-learning"):
        CCETechnique(CCEConfig()).patch_model(model)
