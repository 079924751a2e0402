"""Gradient release through the stock Trainer (MemkitTrainer): same weights and logged grad_norm as the plain run
with a scheduler and with accumulation, per-parameter clipping, resume, and the start-of-training line."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_memkit.optimizer_slot.release import find_release
from tests.conftest import make_args
from tests.optim.cosmos import trainer_checks as checks
from tests.optim.cosmos.trainer_checks import one_cpu_thread  # noqa: F401  (autouse fixture)
from tests.optimizer_slot.release.test_optimizer import SUPPORTED


def recipe(name, **cfg):
    return {"optimizer": {name: {**SUPPORTED[name], **cfg}}}


def train(tiny_path, dataset, out, recipe, **kw):
    from transformers import AutoModelForCausalLM

    from hf_memkit import MemkitTrainer

    kw = {"max_steps": 5, "lr_scheduler_type": "cosine", "warmup_steps": 1, "max_grad_norm": 0.0,
          "weight_decay": 0.1, **kw}
    torch.manual_seed(0)  # adapters draw their initial weights in the recipe's patch
    trainer = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=make_args(out, **kw),
                            train_dataset=dataset, recipe=recipe)
    trainer.train()
    return trainer


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def assert_same_run(plain, released):
    for (n, a), b in zip(plain.model.named_parameters(), released.model.parameters()):
        assert (a - b).abs().max().item() <= 1e-6, n
    assert logged(released, "learning_rate") == logged(plain, "learning_rate")
    want = logged(plain, "grad_norm")
    assert len(want) == 5 and all(g > 0 for g in want)
    assert logged(released, "grad_norm") == pytest.approx(want, rel=1e-5)  # the real norm, not the 0 of freed grads


@pytest.mark.parametrize("name,schedule", [("adamw", "cosine"), ("adamw", "linear"), ("adamw_8bit", "cosine"),
                                           ("cosmos", "cosine"), ("fira", "linear")])
def test_release_equals_the_plain_run(name, schedule, tiny_path, tiny_dataset, tmp_path):
    plain = train(tiny_path, tiny_dataset, tmp_path / "plain", recipe(name), lr_scheduler_type=schedule)
    released = train(tiny_path, tiny_dataset, tmp_path / "release", recipe(name, gradient_release=True),
                     lr_scheduler_type=schedule)
    assert_same_run(plain, released)
    wrapper = find_release(released.optimizer)
    sizes = [p.numel() * 4 for p in released.model.parameters()]
    assert wrapper.memkit_peak_gradient_bytes == max(sizes) < sum(sizes) / 4


def test_accumulation_steps_once_per_step_like_the_plain_run(tiny_path, tiny_dataset, tmp_path):
    plain = train(tiny_path, tiny_dataset, tmp_path / "plain", recipe("adamw"), gradient_accumulation_steps=2)
    released = train(tiny_path, tiny_dataset, tmp_path / "release", recipe("adamw", gradient_release=True),
                     gradient_accumulation_steps=2)
    assert_same_run(plain, released)
    # between micro-batches every gradient is alive, as in the plain run
    assert find_release(released.optimizer).memkit_peak_gradient_bytes == sum(
        p.numel() * 4 for p in released.model.parameters())


def test_per_parameter_clipping_logs_the_global_pre_clip_norm(tiny_path, tiny_dataset, tmp_path, caplog):
    plain = train(tiny_path, tiny_dataset, tmp_path / "plain", recipe("adamw"), max_grad_norm=0.5, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="hf_memkit"):
        released = train(tiny_path, tiny_dataset, tmp_path / "release", recipe("adamw", gradient_release=True),
                         max_grad_norm=0.5, max_steps=2)
    said = [r.getMessage() for r in caplog.records if "per-parameter clipping" in r.getMessage()]
    assert len(said) == 1 and "0.5" in said[0]
    first = logged(plain, "grad_norm")[0]
    assert first > 0.5  # the plain run clipped globally at step 1
    assert logged(released, "grad_norm")[0] == pytest.approx(first, rel=1e-5)
    line = released.memkit.techniques[0].describe(released.model, released.optimizer)
    assert "torch.AdamW" in line and "gradient release on" in line and "clipped to norm 0.5 on its own" in line


def test_refuse_clipping_stops_unless_max_grad_norm_is_0(tiny_path, tiny_dataset, tmp_path):
    from hf_memkit import RecipeError

    with pytest.raises(RecipeError) as err:
        train(tiny_path, tiny_dataset, tmp_path, recipe("adamw", gradient_release=True, release_clipping="refuse"),
              max_grad_norm=1.0)
    text = str(err.value)
    assert "max_grad_norm is 1.0" in text and "--max_grad_norm 0" in text and "per_parameter" in text
    released = train(tiny_path, tiny_dataset, tmp_path, recipe("adamw", gradient_release=True,
                                                               release_clipping="refuse"), max_steps=1)
    assert "no clipping" in released.memkit.techniques[0].describe(released.model, released.optimizer)


def test_resume_gives_the_uninterrupted_runs_weights(tiny_path, tiny_dataset, tmp_path):
    """4 steps vs 2 + checkpoint + resume + 2, with a cosine schedule, accumulation and per-parameter clipping."""
    checks.assert_trainer_resume_matches(tiny_path, tiny_dataset, tmp_path, recipe("adamw", gradient_release=True))


def test_a_second_train_call_keeps_one_wrapper(tiny_path, tiny_dataset, tmp_path):
    trainer = train(tiny_path, tiny_dataset, tmp_path, recipe("adamw", gradient_release=True), max_steps=1)
    first = find_release(trainer.optimizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.args.max_steps = 2
    trainer.train()  # a fresh run of 2 steps: 3 optimizer steps in all
    assert find_release(trainer.optimizer) is first
    steps = [s["step"] for s in first.optimizer.state.values()]
    assert {int(s) for s in steps} == {3}, "each parameter stepped once per optimizer step, not twice"
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_bf16_autocast_with_accumulation_and_clipping(tiny_path, tiny_dataset, tmp_path):
    checks.assert_trains_in_bf16(tiny_path, tiny_dataset, tmp_path, recipe("adamw", gradient_release=True))


def test_lora_and_gradient_checkpointing(tiny_path, tiny_dataset, tmp_path):
    """Hooks fire once per parameter after its last use, recomputation included: the same weights as plain."""
    lora = {"adapter": {"lora": {"r": 4}}}
    plain = train(tiny_path, tiny_dataset, tmp_path / "plain", {**recipe("adamw"), **lora},
                  gradient_checkpointing=True, max_steps=3)
    released = train(tiny_path, tiny_dataset, tmp_path / "release",
                      {**recipe("adamw", gradient_release=True), **lora}, gradient_checkpointing=True, max_steps=3)
    for (n, a), b in zip(plain.model.named_parameters(), released.model.parameters()):
        assert (a - b).abs().max().item() <= 1e-6, n
    assert logged(released, "grad_norm") == pytest.approx(logged(plain, "grad_norm"), rel=1e-5)


def test_release_drives_the_precision_slots_wrapper(tiny_path, tiny_dataset, tmp_path):
    """precision: bf16 wraps the optimizer first (WriteBack16), release wraps that: the same 16-bit weights as
    the plain run, with half-size gradients. (Stochastic rounding would draw in backward order: other draws.)"""
    bf16 = {"precision": {"bf16": {"update": "kahan"}}}
    plain = train(tiny_path, tiny_dataset, tmp_path / "plain", {**recipe("adamw"), **bf16}, max_steps=3)
    released = train(tiny_path, tiny_dataset, tmp_path / "release", {**recipe("adamw", gradient_release=True), **bf16},
                     max_steps=3)
    for (n, a), b in zip(plain.model.named_parameters(), released.model.parameters()):
        assert torch.equal(a, b), n
    assert logged(released, "grad_norm") == pytest.approx(logged(plain, "grad_norm"), rel=1e-5)
    wrapper = find_release(released.optimizer)
    assert type(wrapper.optimizer).__name__ == "WriteBack16"
    assert wrapper.memkit_peak_gradient_bytes == max(p.numel() * p.element_size() for p in released.model.parameters())
