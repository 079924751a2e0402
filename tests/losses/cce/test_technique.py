"""loss.cce through the recipe and the Trainer: training, gradient accumulation, evaluation, estimate, errors."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch

from hf_memkit import MemkitTrainer, estimate_memory, load_recipe
from hf_memkit.errors import RecipeError
from hf_memkit.losses.cce.config import CCEConfig
from tests.conftest import make_args

CCE = {"loss": {"cce": {}}}


def _train(model, dataset, tmp_path, recipe, **kw):
    # SGD: the weights move by the gradients themselves (Adam's first steps amplify 1e-7 differences of
    # near-zero gradients to ±lr)
    args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=2, optim="sgd", **kw)
    trainer = MemkitTrainer(model=model, args=args, train_dataset=dataset, recipe=recipe)
    out = trainer.train()
    return trainer, out


@pytest.mark.parametrize("accumulation,checkpointing", [(1, False), (2, False), (1, True)])
def test_training_matches_the_plain_trainer(tiny_path, tiny_dataset, tmp_path, accumulation, checkpointing):
    from transformers import AutoModelForCausalLM

    plain, plain_out = _train(AutoModelForCausalLM.from_pretrained(tiny_path), tiny_dataset, tmp_path / "plain", {},
                              gradient_accumulation_steps=accumulation)
    ours, ours_out = _train(AutoModelForCausalLM.from_pretrained(tiny_path), tiny_dataset, tmp_path / "cce", CCE,
                            gradient_accumulation_steps=accumulation, gradient_checkpointing=checkpointing)
    assert ours_out.training_loss == pytest.approx(plain_out.training_loss, rel=1e-5)
    for (n, a), b in zip(ours.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_training_with_a_lora_adapter_on_lm_head(tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {"adapter": {"lora": {"target_modules": ["q_proj", "v_proj", "lm_head"], "lora_dropout": 0.0}}}
    plain, plain_out = _train(AutoModelForCausalLM.from_pretrained(tiny_path), tiny_dataset, tmp_path / "p", recipe)
    ours, ours_out = _train(AutoModelForCausalLM.from_pretrained(tiny_path), tiny_dataset, tmp_path / "c",
                            {**recipe, **CCE})
    assert ours_out.training_loss == pytest.approx(plain_out.training_loss, rel=1e-5)
    trained = {n: p for n, p in ours.model.named_parameters() if p.requires_grad}
    assert any("lm_head.lora_B" in n for n in trained)
    for n, p in plain.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[n], p, rtol=1e-4, atol=1e-6, msg=n)


def test_evaluate_reports_the_loss_without_logits_and_predict_returns_them(tiny_model, tiny_path, tiny_dataset,
                                                                           tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    args = make_args(tmp_path, per_device_eval_batch_size=4)
    small = tiny_dataset.select(range(8))
    plain = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args)
    ours = MemkitTrainer(model=tiny_model, args=args, recipe=CCE)
    patch = ours.memkit.of_slot("loss")._patch
    seen = []
    logits_fn = patch.logits
    patch.logits = lambda h: seen.append(h.shape) or logits_fn(h)

    assert ours.evaluate(small)["eval_loss"] == pytest.approx(plain.evaluate(small)["eval_loss"], rel=1e-5)
    assert not seen, "evaluate() without compute_metrics keeps no logits, so none are computed"
    pred = ours.predict(small)
    ref = plain.predict(small)
    assert seen, "predict() keeps the logits, so they are computed"
    torch.testing.assert_close(torch.as_tensor(pred.predictions), torch.as_tensor(ref.predictions))
    assert pred.metrics["test_loss"] == pytest.approx(ref.metrics["test_loss"], rel=1e-5)


def test_unpatch_after_training_restores_structure_and_forward(tiny_model, tiny_dataset, tmp_path):
    names = [n for n, _ in tiny_model.named_parameters()]
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    trainer, _ = _train(tiny_model, tiny_dataset, tmp_path, CCE)
    restored = trainer.memkit.unpatch()
    assert restored is tiny_model and "forward" not in vars(tiny_model)
    assert [n for n, _ in restored.named_parameters()] == names
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == flags


def test_estimate_drops_the_logit_matrix():
    from hf_memkit.data.models import tiny_config

    config = tiny_config(vocab_size=49152)  # SmolLM2's vocabulary on the tiny body
    plain = estimate_memory(config, {}, batch_size=8, seq_len=512).to_dict()
    ours = estimate_memory(config, {"loss": {"cce": {"memory_budget_mb": 32}}}, batch_size=8, seq_len=512).to_dict()
    assert plain["logits"] == 8 * 512 * 49152 * 4 and ours["logits"] == 0
    assert ours["loss_buffers"] <= 32 * 2**20 + 8 * 512 * 24 + 49152 * 16
    assert ours["total_bytes"] < plain["total_bytes"] / 3


def test_config_defaults_yaml_example_and_errors():
    assert CCEConfig().impl == "auto"
    example = textwrap.dedent(re.search(r"```yaml\n(.*?)```", CCEConfig.__doc__, re.S).group(1))
    recipe = load_recipe("memkit: 1\n" + example)
    assert recipe.get("cce").config.filter_eps == "auto"
    with pytest.raises(RecipeError, match="did you mean 'z_loss'"):
        load_recipe({"loss": {"cce": {"zloss": 0.1}}})
    with pytest.raises(RecipeError, match="impl"):
        load_recipe({"loss": {"cce": {"impl": "cuda"}}})
    with pytest.raises(RecipeError, match="label_smoothing_factor"):
        load_recipe({"loss": {"cce": {}}, "training_args": {"label_smoothing_factor": 0.1}})


def test_label_smoothing_set_outside_the_recipe_is_refused(tiny_model, tiny_dataset, tmp_path):
    args = make_args(tmp_path, max_steps=1, label_smoothing_factor=0.1)
    trainer = MemkitTrainer(model=tiny_model, args=args, train_dataset=tiny_dataset, recipe=CCE)
    with pytest.raises(RecipeError, match="label_smoothing_factor"):
        trainer.train()


def test_batch_without_labels_is_a_clear_error(tiny_model):
    from hf_memkit.losses.cce.technique import CCETechnique

    technique = CCETechnique(CCEConfig())
    technique.patch_model(tiny_model)
    with pytest.raises(RecipeError, match="labels"):
        technique.loss(tiny_model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
