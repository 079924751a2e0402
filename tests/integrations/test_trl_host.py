"""TRL as a first-class host: no extra forward pass per step, SFTTrainer's own metrics under ``loss: cce``,
DPO/GRPO trainers wired like any Trainer, and TRL's conflicting flags refused with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from hf_memkit import apply_recipe, load_recipe  # noqa: E402
from hf_memkit.errors import MemkitError, RecipeError  # noqa: E402
from hf_memkit.integrations.launcher import recipe_installed  # noqa: E402

LORA_8BIT = {"optimizer": {"adamw_8bit": {}}, "adapter": {"lora": {"r": 4}}}
METRICS = ("entropy", "mean_token_accuracy", "num_tokens")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@pytest.fixture
def text_dataset():
    from datasets import Dataset

    from hf_memkit.data.corpus import split_topics

    train, _ = split_topics()
    return Dataset.from_dict({"text": [t[:200] for t in train[:32]]})


@pytest.fixture
def preference_dataset():
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": ["def add(a, b):", "import os", "class A:", "for i in"] * 2,
        "chosen": [" return a + b", " print(os.sep)", " pass", " range(3):"] * 2,
        "rejected": [" return a - b", " os.exit()", " fail", " banana"] * 2,
    })


def _sft(model, tok, ds, tmp_path, **kw):
    from trl import SFTConfig, SFTTrainer

    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], seed=0,
                save_strategy="no", logging_steps=1, learning_rate=1e-2, disable_tqdm=True,
                dataloader_pin_memory=False, max_length=32, bf16=False)
    peft_config = kw.pop("peft_config", None)
    eval_ds = kw.pop("eval_dataset", None)
    base.update(kw)
    return SFTTrainer(model=model, args=SFTConfig(**base), train_dataset=ds, eval_dataset=eval_ds,
                      processing_class=tok, peft_config=peft_config)


def _stock(model, ds, tmp_path):
    from tests.conftest import make_args
    from transformers import Trainer

    return Trainer(model=model, args=make_args(tmp_path, seed=0), train_dataset=ds)


def _train_counting_forwards(trainer) -> float:
    """Training steps run / forward passes of the backbone (LlamaModel is called through ``__call__`` by the stock
    forward, TRL's fused head and loss.cce alike; gradient checkpointing re-runs layers, not the backbone)."""
    backbone = next(m for m in trainer.model.modules() if type(m).__name__ == "LlamaModel")
    calls = []
    handle = backbone.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        steps = trainer.train().global_step
    finally:
        handle.remove()
    return len(calls) / steps


# ---------------------------------------------------------------------------------------------------------------
# 1: the wrapper never asks the host for outputs nobody reads


@pytest.mark.parametrize("recipe", [None, "default", LORA_8BIT])
def test_sft_runs_one_forward_per_step_with_or_without_a_recipe(recipe, tiny_path, tiny_tokenizer, text_dataset,
                                                                 tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = _sft(AutoModelForCausalLM.from_pretrained(tiny_path), tiny_tokenizer, text_dataset, tmp_path)
    if recipe is not None:
        apply_recipe(trainer, recipe)
    # TRL 1.16 recomputes the logits with a second forward when compute_loss is asked for outputs
    assert _train_counting_forwards(trainer) == 1.0


@pytest.mark.parametrize("recipe", [None, "default", LORA_8BIT])
def test_stock_trainer_runs_one_forward_per_step(recipe, tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = _stock(AutoModelForCausalLM.from_pretrained(tiny_path), tiny_dataset, tmp_path)
    if recipe is not None:
        apply_recipe(trainer, recipe)
    assert _train_counting_forwards(trainer) == 1.0


def test_outputs_only_for_callers_and_techniques_that_read_them():
    from hf_memkit.integrations.trainer import RecipeRuntime
    from hf_memkit.technique import Technique

    seen = []

    class Reads(Technique):
        name = "reads"

        def extra_loss(self, model, inputs, outputs):
            seen.append(("reads", outputs))
            return torch.tensor(1.0)

    class Blind(Reads):
        name = "blind"
        extra_loss_needs_outputs = False

    asked = []

    def host(model, inputs, return_outputs=False, num_items_in_batch=None):
        asked.append(return_outputs)
        return (torch.tensor(2.0), {"logits": 1}) if return_outputs else torch.tensor(2.0)

    runtime = RecipeRuntime(load_recipe({}))
    runtime.techniques = []
    assert float(runtime.compute_loss(host, None, {})) == 2.0 and asked == [False]
    assert runtime.compute_loss(host, None, {}, return_outputs=True)[1] == {"logits": 1} and asked[-1] is True
    runtime.techniques = [Blind()]
    assert float(runtime.compute_loss(host, None, {})) == 3.0 and asked[-1] is False and seen[-1][1] is None
    runtime.techniques = [Blind(), Reads()]
    assert float(runtime.compute_loss(host, None, {})) == 4.0 and asked[-1] is True
    assert seen[-1] == ("reads", {"logits": 1})


# ---------------------------------------------------------------------------------------------------------------
# 2: SFTTrainer's metrics under loss: cce


def _logged(trainer):
    return [{k: h[k] for k in METRICS} for h in trainer.state.log_history if "entropy" in h]


@pytest.mark.parametrize("recipe,route", [({"loss": {"cce": {}}}, "apply_recipe"), ({"loss": {"cce": {}}}, "launcher"),
                                          ("default", "apply_recipe")])
def test_sft_metrics_under_cce_equal_trls_own(recipe, route, tiny_path, tiny_tokenizer, text_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    runs = {}
    for name, rec in (("trl", None), ("cce", recipe)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_path)  # no dropout in the tiny Llama (p = 0)
        build = lambda: _sft(model, tiny_tokenizer, text_dataset, tmp_path / name,  # noqa: E731
                             eval_dataset=text_dataset.select(range(8)))
        if rec is not None and route == "launcher":  # wired inside Trainer.__init__, before SFTTrainer's metrics
            with recipe_installed(load_recipe(rec)):
                trainer = build()
        else:
            trainer = build()
            if rec is not None:
                apply_recipe(trainer, rec)
        trainer.train()
        runs[name] = (_logged(trainer), trainer.evaluate())
    (trl_logs, trl_eval), (cce_logs, cce_eval) = runs["trl"], runs["cce"]
    assert len(cce_logs) == len(trl_logs) == 2
    for key in METRICS:  # the first step sees identical weights; LoRA starts as the identity too
        assert cce_logs[0][key] == pytest.approx(trl_logs[0][key], abs=1e-4), key
    if recipe != "default":  # the same full fine-tune: the second step matches as well (accuracy > 0 there)
        for key in METRICS:
            assert cce_logs[1][key] == pytest.approx(trl_logs[1][key], abs=1e-4), key
    for key in ("eval_entropy", "eval_mean_token_accuracy"):
        assert key in cce_eval and key in trl_eval
    if recipe != "default":
        assert cce_eval["eval_entropy"] == pytest.approx(trl_eval["eval_entropy"], abs=1e-4)
        assert cce_eval["eval_mean_token_accuracy"] == pytest.approx(trl_eval["eval_mean_token_accuracy"], abs=1e-4)


def test_stock_trainer_with_cce_computes_no_token_statistics(tiny_model, tiny_dataset, tmp_path):
    trainer = _stock(tiny_model, tiny_dataset, tmp_path)
    apply_recipe(trainer, {"loss": {"cce": {}}})
    assert trainer.memkit.of_slot("loss")._sink is None  # no host logs them: the op skips the extra work
    trainer.train()


# ---------------------------------------------------------------------------------------------------------------
# 3: DPO and GRPO get the recipe through the same wiring


def _dpo(model, tok, ds, tmp_path, **kw):
    from trl import DPOConfig, DPOTrainer

    cfg = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                    save_strategy="no", logging_steps=1, learning_rate=1e-2, disable_tqdm=True,
                    dataloader_pin_memory=False, max_length=32, bf16=False, **kw)
    return DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)


def _grpo(model, tok, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = Dataset.from_dict({"prompt": ["def add(a, b):", "import os", "class A:", "for i in"] * 2})

    def longer_is_better(completions, **kw):
        return [float(len(c)) for c in completions]

    cfg = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                     max_completion_length=4, report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-2,
                     disable_tqdm=True, dataloader_pin_memory=False, bf16=False)
    return GRPOTrainer(model=model, reward_funcs=longer_is_better, args=cfg, train_dataset=prompts,
                       processing_class=tok)


def _assert_lora_8bit_trained(trainer):
    assert type(trainer.model).__name__ == "PeftModelForCausalLM"
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert trainer.train().global_step == 2
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    assert any(not torch.equal(p, lora[n]) for n, p in trainer.model.named_parameters() if n in lora)


def test_dpo_trains_with_a_lora_8bit_recipe_through_the_launcher(tiny_model, tiny_tokenizer, preference_dataset,
                                                                 tmp_path):
    with recipe_installed(load_recipe(LORA_8BIT)):
        trainer = _dpo(tiny_model, tiny_tokenizer, preference_dataset, tmp_path)
    assert trainer.memkit is not None
    assert trainer.ref_model is None  # the adapter came first: DPO disables it for the reference, no model copy
    _assert_lora_8bit_trained(trainer)
    assert "rewards/margins" in trainer.state.log_history[0]  # DPO's own loss and metrics ran


def test_dpo_trains_with_apply_recipe(tiny_model, tiny_tokenizer, preference_dataset, tmp_path):
    trainer = _dpo(tiny_model, tiny_tokenizer, preference_dataset, tmp_path)
    apply_recipe(trainer, LORA_8BIT)
    _assert_lora_8bit_trained(trainer)


def test_grpo_trains_with_a_lora_8bit_recipe(tiny_model, tiny_tokenizer, tmp_path):
    with recipe_installed(load_recipe(LORA_8BIT)):
        trainer = _grpo(tiny_model, tiny_tokenizer, tmp_path)
    assert trainer.memkit is not None
    _assert_lora_8bit_trained(trainer)
    assert "reward" in trainer.state.log_history[0]


@pytest.mark.parametrize("host", ["dpo", "grpo"])
@pytest.mark.parametrize("route", ["launcher", "apply_recipe"])
def test_a_loss_technique_is_refused_under_dpo_and_grpo(host, route, tiny_model, tiny_tokenizer,
                                                        preference_dataset, tmp_path):
    build = (lambda: _dpo(tiny_model, tiny_tokenizer, preference_dataset, tmp_path)) if host == "dpo" else \
        (lambda: _grpo(tiny_model, tiny_tokenizer, tmp_path))
    recipe = {"loss": {"cce": {}}, **LORA_8BIT}
    with pytest.raises(RecipeError) as err:
        if route == "launcher":
            with recipe_installed(load_recipe(recipe)):
                build()
        else:
            apply_recipe(build(), recipe)
    msg = str(err.value)
    name = "DPOTrainer" if host == "dpo" else "GRPOTrainer"
    assert name in msg and "loss.cce" in msg and "next-token cross-entropy" in msg
    assert "remove the loss slot" in msg


# ---------------------------------------------------------------------------------------------------------------
# 4: TRL's own flags that collide with the recipe


def test_use_liger_kernel_with_a_loss_technique_is_refused(tiny_model, tiny_tokenizer, text_dataset, tmp_path):
    trainer = _sft(tiny_model, tiny_tokenizer, text_dataset, tmp_path, use_liger_kernel=True)
    with pytest.raises(RecipeError) as err:
        apply_recipe(trainer, {"loss": {"cce": {}}})
    msg = str(err.value)
    assert "use_liger_kernel=True" in msg and "loss.cce" in msg and "use_liger_kernel=False" in msg


def test_peft_config_with_a_recipe_adapter_is_refused_by_the_check(tiny_model, tiny_tokenizer, text_dataset,
                                                                     tmp_path):
    from peft import LoraConfig

    from hf_memkit.integrations.trl import check_adapter_host

    trainer = _sft(tiny_model, tiny_tokenizer, text_dataset, tmp_path,
                   peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"))
    with pytest.raises(RecipeError) as err:
        check_adapter_host(trainer.model, load_recipe(LORA_8BIT))
    msg = str(err.value)
    assert "peft_config" in msg and "adapter.lora" in msg and "drop peft_config" in msg
    check_adapter_host(trainer.model, load_recipe({"optimizer": {"adamw_8bit": {}}}))  # no adapter slot: fine


@pytest.mark.parametrize("route", ["launcher", "apply_recipe"])
def test_peft_config_with_a_recipe_adapter_stops_before_training(route, tiny_model, tiny_tokenizer, text_dataset,
                                                                 tmp_path):
    from peft import LoraConfig

    def build():
        return _sft(tiny_model, tiny_tokenizer, text_dataset, tmp_path, peft_config=LoraConfig(r=4,
                                                                                              task_type="CAUSAL_LM"))

    with pytest.raises(RecipeError, match="(?s)already carries a PEFT adapter.*drop peft_config"):
        if route == "launcher":
            with recipe_installed(load_recipe(LORA_8BIT)):
                build()
        else:
            apply_recipe(build(), LORA_8BIT)
