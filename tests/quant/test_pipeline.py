"""The compress slot in a run: bad input fails before any work, post-training passes keep the model's structure
and calibrate on the run's data, quantizers run before training when e2e_qp follows."""

from __future__ import annotations

import json

import pytest
import torch

from hf_memkit import MemkitTrainer, load_recipe
from hf_memkit.errors import IncompatibleModelError, RecipeError
from hf_memkit.compress.linear import quantized_modules
from hf_memkit.quant.pipeline import quantize_model_
from tests.conftest import make_args


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# bad input: a clear error, before any work


@pytest.mark.parametrize("settings,match", [
    ({"bits": 5}, "bits.*Input should be 2, 3, 4 or 8"),
    ({"bits": 1}, "Input should be 2, 3, 4 or 8"),
    ({"group_size": 0}, "group_size"),
    ({"num_samples": 0}, "num_samples"),
])
def test_unsupported_settings_fail_at_recipe_load(settings, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe({"compress": [{"gptq": settings}]})


def test_group_size_not_dividing_a_width_fails_before_training(tiny_model, tiny_dataset, tmp_path):
    before = _weights(tiny_model)
    recipe = {"compress": [{"rtn": {"group_size": 48}}]}  # 64- and 128-wide inputs: 48 divides neither
    with pytest.raises(IncompatibleModelError, match="group_size 48 does not divide the input width 64.*group_size: 64"):
        MemkitTrainer(model=tiny_model, args=make_args(tmp_path), train_dataset=tiny_dataset, recipe=recipe)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    with pytest.raises(IncompatibleModelError, match="does not divide"):
        quantize_model_(tiny_model, "gptq", load_recipe(recipe).techniques[0].config)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


def test_missing_calibration_data(tiny_model):
    before = _weights(tiny_model)
    with pytest.raises(IncompatibleModelError, match="gptq needs calibration data"):
        quantize_model_(tiny_model, "gptq")
    with pytest.raises(IncompatibleModelError, match="block_ap needs calibration data"):
        quantize_model_(tiny_model, "block_ap")
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


def test_calibration_train_without_training_data_is_a_recipe_error(tmp_path):
    from hf_memkit.quant.oneshot import compress

    with pytest.raises(RecipeError, match="calibration: train needs a training run"):
        compress("tiny", {"compress": [{"gptq": {"calibration": "train"}}]}, str(tmp_path))
    with pytest.raises(RecipeError, match="runs before training"):
        from hf_memkit.integrations.trainer import RecipeRuntime

        RecipeRuntime(load_recipe({"compress": [{"gptq": {"calibration": "train"}}, {"e2e_qp": {}}]})).validate(
            None, {})
    with pytest.raises(RecipeError, match="no `compress:` techniques"):
        compress("tiny", {"optimizer": {"adamw": {}}}, str(tmp_path))


def test_corpus_calibration_without_any_tokenizer_fails_at_train_begin(tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    model.name_or_path = model.config._name_or_path = ""  # no folder to find a tokenizer in
    trainer = MemkitTrainer(model=model, args=make_args(tmp_path), train_dataset=tiny_dataset,
                            recipe={"compress": [{"gptq": {"calibration": "corpus"}}]})
    with pytest.raises(IncompatibleModelError, match="needs a tokenizer for the embedded corpus"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_model_without_linear_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    model.lm_head = torch.nn.Identity()  # GPT-2's projections are Conv1D: nothing is an nn.Linear
    with pytest.raises(IncompatibleModelError, match="has no nn.Linear layer to quantize.*Conv1D"):
        quantize_model_(model, "rtn")
    from hf_memkit.quant.rtn.technique import RTNTechnique
    from hf_memkit.technique import ValidationContext

    t = RTNTechnique()
    with pytest.raises(IncompatibleModelError, match="no nn.Linear"):  # caught from the config alone
        t.validate(ValidationContext(load_recipe({"compress": [{"rtn": {"skip_modules": ["lm_head", "c_attn"]}}]}),
                                     GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))


def test_quantizing_twice_is_refused(tiny_model):
    quantize_model_(tiny_model, "rtn")
    with pytest.raises(IncompatibleModelError, match="already quantized"):
        quantize_model_(tiny_model, "rtn")


def test_two_quantizers_and_an_adapter_are_recipe_errors():
    with pytest.raises(RecipeError, match="one quantizer per recipe"):
        load_recipe({"compress": [{"gptq": {}}, {"block_ap": {}}]})
    with pytest.raises(RecipeError, match="merge"):
        load_recipe({"adapter": {"lora": {}}, "compress": [{"rtn": {}}]})


# ---------------------------------------------------------------------------------------------------------
# in a run


def test_post_training_pass_exports_beside_the_trained_model_and_keeps_it(tiny_model, tiny_dataset, tmp_path):
    """The pass runs in finalize on the trained weights and lands in export/ (quantized, LoRC folded in: the
    default safetensors export); the model keeps its trained weights, module types, state-dict keys and flags."""
    from transformers import TrainerCallback

    types = {n: type(m) for n, m in tiny_model.named_modules()}
    keys = list(tiny_model.state_dict())
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    recipe = {"compress": [{"gptq": {"num_samples": 16, "group_size": 32}}, {"lorc": {"rank": 2}}]}
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset,
                            recipe=recipe)
    trained = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            trained.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    trainer.add_callback(Keep())
    trainer.train()
    assert not quantized_modules(tiny_model)
    assert trained and all(torch.equal(v, trained[k]) for k, v in tiny_model.state_dict().items())
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert report["techniques"] == ["gptq", "lorc"] and report["stage"] == "after"
    assert report["pass"]["calibration"] == "16 sequences x 32 tokens from the training data"
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "export" / "model.safetensors")
    moved = [k for k in exported if k.endswith("proj.weight") and not torch.equal(exported[k], trained[k])]
    assert len(moved) == 14  # the 14 decoder projections hold their quantized (+LoRC) values
    assert (tmp_path / "export" / "memkit_export.json").is_file()
    assert trainer.memkit.unpatch() is tiny_model
    assert {n: type(m) for n, m in tiny_model.named_modules()} == types
    assert list(tiny_model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags


def test_quantizer_before_e2e_runs_at_patch_time_and_remove_restores(tiny_model, tiny_dataset, tmp_path):
    before = _weights(tiny_model)
    recipe = {"compress": [{"block_ap": {"num_samples": 8, "seq_len": 32, "epochs": 1}}, {"e2e_qp": {}}]}
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset,
                            recipe=recipe)
    scales = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert scales and all(n.endswith("weight_scale") for n in scales)
    trainer.train()
    assert any(not torch.equal(p, scales[n]) for n, p in trainer.model.named_parameters() if n in scales)
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert report["stage"] == "before" and "embedded corpus" in report["pass"]["calibration"]
    assert trainer.memkit.unpatch() is tiny_model
    assert not quantized_modules(tiny_model)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


def test_estimate_of_post_training_passes_leaves_training_memory_alone():
    from hf_memkit import estimate_memory

    plain = estimate_memory("tiny", {}, batch_size=2, seq_len=32).to_dict()
    for name in ("rtn", "gptq", "lorc", "block_ap"):
        est = estimate_memory("tiny", {"compress": [{name: {}}]}, batch_size=2, seq_len=32).to_dict()
        assert {k: v for k, v in est.items() if k not in ("terms", "inputs")} == \
               {k: v for k, v in plain.items() if k not in ("terms", "inputs")}, name


def test_e2e_estimate_uses_the_preceding_quantizers_grid():
    from hf_memkit import estimate_memory

    def scale_bytes(recipe):
        est = estimate_memory("tiny", recipe, batch_size=2, seq_len=32)
        return sum(p.storage_bytes for n, p in est.params.items() if n.endswith("weight_scale"))

    alone = scale_bytes({"compress": [{"e2e_qp": {}}]})
    grouped = scale_bytes({"compress": [{"rtn": {"group_size": 16}}, {"e2e_qp": {}}]})
    assert grouped > alone > 0


def test_a_tied_output_head_is_refused():
    from transformers import LlamaForCausalLM

    from hf_memkit.data.models import tiny_config
    from hf_memkit.quant.rtn.config import RTNConfig

    config = tiny_config()
    config.tie_word_embeddings = True
    with pytest.raises(IncompatibleModelError, match="lm_head.weight is the same tensor as model.embed_tokens"):
        quantize_model_(LlamaForCausalLM(config), "rtn", RTNConfig(skip_modules=[]))
