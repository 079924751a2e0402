"""LISA through the Trainer on a 6-layer tiny Llama: the acceptance items of issue 6."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from hf_memkit import MemkitTrainer, RecipeError
from hf_memkit.memory.profiler import optimizer_state_bytes
from hf_memkit.schedules.optimizer_state import inner_optimizer
from tests.conftest import make_args, measure_one_step
from tests.schedules.conftest import fresh_model6, six_layer_model

ALWAYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def lisa(**kw):
    return {"schedule": [{"lisa": {"active_layers": 2, **kw}}]}


class Recorder(TrainerCallback):
    """Per optimizer step: the layers that require grad, which parameters have gradients, what the step changed,
    and which parameters the optimizer keeps state for (and its bytes)."""

    def __init__(self):
        self.steps: list[dict] = []
        self._before: dict = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        layers = model.model.layers
        flags = [[p.requires_grad for p in layer.parameters()] for layer in layers]
        assert all(all(f) or not any(f) for f in flags), "a layer is partly frozen"
        named = dict(model.named_parameters())
        self.steps.append({
            "step": state.global_step,
            "active": [i for i, f in enumerate(flags) if all(f)],
            "always": all(named[n].requires_grad for n in ALWAYS),
            "with_grad": {n for n, p in named.items() if p.grad is not None},
        })
        self._before = {n: p.detach().clone() for n, p in named.items()}

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        names = {id(p): n for n, p in model.named_parameters()}
        rec = self.steps[-1]
        rec["changed"] = {n for n, p in model.named_parameters() if not torch.equal(p, self._before[n])}
        rec["state"] = {names[id(p)] for p, s in inner_optimizer(optimizer).state.items() if s}
        rec["state_bytes"] = optimizer_state_bytes(optimizer)


def layer_params(i: int, model) -> set[str]:
    return {f"model.layers.{i}.{n}" for n, _ in model.model.layers[i].named_parameters()}


def run(tmp_path, dataset, recipe, steps, model=None, **args):
    rec = Recorder()
    trainer = MemkitTrainer(model=model or six_layer_model(), args=make_args(tmp_path, max_steps=steps, **args),
                            train_dataset=dataset, callbacks=[rec], recipe=recipe)
    trainer.train()
    return trainer, rec


def test_gamma_layers_rotate_at_multiples_of_k_with_flat_optimizer_state(tmp_path, tiny_dataset):
    """10 intervals of K=2 steps: exactly γ layers (and the always-trained parts) train at every step; the set
    changes only at multiples of K; frozen layers are bit-identical while frozen; the optimizer keeps state
    for exactly the active + always-trained parameters, and its bytes stay flat."""
    trainer, rec = run(tmp_path, tiny_dataset, lisa(interval=2), 20)
    model = trainer.model
    sets = [tuple(s["active"]) for s in rec.steps]
    assert len(sets) == 20 and all(len(s) == 2 for s in sets) and all(s["always"] for s in rec.steps)
    for step in range(1, 20):
        if step % 2:
            assert sets[step] == sets[step - 1], f"the set changed at step {step}, inside an interval"
    assert len(set(sets[::2])) > 1, "the active set never changed over 10 intervals"
    for s in rec.steps:
        trained = set(ALWAYS).union(*(layer_params(i, model) for i in s["active"]))
        assert s["with_grad"] == trained, "gradients must exist exactly for the active + always-trained params"
        assert s["changed"] == trained, "only active + always-trained parameters may change in a step"
        assert s["state"] == trained, "optimizer state must cover exactly the active + always-trained params"
    assert len({s["state_bytes"] for s in rec.steps}) == 1, [s["state_bytes"] for s in rec.steps]


def test_keeping_state_grows_memory_as_layers_are_visited(tmp_path, tiny_dataset):
    _, rec = run(tmp_path, tiny_dataset, lisa(interval=1, drop_optimizer_state=False), 6)
    bytes_ = [s["state_bytes"] for s in rec.steps]
    assert bytes_ == sorted(bytes_) and bytes_[-1] > bytes_[0]  # LMFlow's behaviour, for contrast


def test_resume_mid_interval_continues_with_the_same_set_and_sampler(tmp_path, model6_state, tiny_dataset):
    recipe = lisa(interval=4)
    args = dict(save_strategy="steps", save_steps=6)
    full, rec_full = run(tmp_path, tiny_dataset, recipe, 10, model=fresh_model6(model6_state), **args)
    resumed_trainer = MemkitTrainer(model=fresh_model6(model6_state),
                                    args=make_args(tmp_path, max_steps=10, **args),
                                    train_dataset=tiny_dataset, callbacks=[rec := Recorder()], recipe=recipe)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert [s["step"] for s in rec.steps] == [6, 7, 8, 9]
    assert [s["active"] for s in rec.steps] == [s["active"] for s in rec_full.steps[6:]]
    assert rec.steps[0]["active"] == rec_full.steps[4]["active"]  # step 6 is mid-interval [4, 8)
    a, b = full.memkit.techniques[0].state_dict(), resumed_trainer.memkit.techniques[0].state_dict()
    assert a["active_layers"] == b["active_layers"] and torch.equal(a["sampler_state"], b["sampler_state"])
    for (n, p), q in zip(full.model.named_parameters(), resumed_trainer.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("extra, args", [
    ({"optimizer": {"adamw_8bit": {}}}, {}),
    ({}, {"gradient_accumulation_steps": 2}),
    ({"training_args": {"gradient_checkpointing": True}}, {}),
    ({}, {"bf16": True, "use_cpu": True}),
    ({"loss": {"cce": {}}}, {}),
], ids=["adamw_8bit", "grad_accum", "grad_checkpointing", "bf16", "cce"])
def test_works_with(extra, args, tmp_path, tiny_dataset):
    from hf_memkit import registry

    if "loss" in extra and registry.get("cce") is None:
        pytest.skip("the cce technique is not registered")
    trainer, rec = run(tmp_path, tiny_dataset, {**lisa(interval=2), **extra}, 3, **args)
    for s in rec.steps:
        trained = set(ALWAYS).union(*(layer_params(i, trainer.model) for i in s["active"]))
        assert len(s["active"]) == 2 and s["with_grad"] == trained and s["state"] == trained
    assert rec.steps[2]["active"] != rec.steps[1]["active"] or rec.steps[0]["active"] == rec.steps[2]["active"]
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


@pytest.mark.parametrize("recipe", [
    lisa(),
    {**lisa(), "optimizer": {"adamw_8bit": {}}, "training_args": {"gradient_checkpointing": True}},
], ids=["adamw", "adamw_8bit+checkpointing"])
def test_estimate_matches_measurement(recipe, tmp_path, tiny_dataset):
    from hf_memkit.memory.report import MEASURED

    est, measured = measure_one_step(six_layer_model(), tiny_dataset, recipe, tmp_path)
    for cat in MEASURED:
        assert est.get(cat, 0) == pytest.approx(measured[cat], rel=0.02, abs=1024), cat


def test_an_optimizer_without_the_layers_is_rejected(tmp_path, tiny_dataset):
    model = six_layer_model()
    opt = torch.optim.AdamW(model.lm_head.parameters(), lr=1e-3)
    trainer = MemkitTrainer(model=model, args=make_args(tmp_path), train_dataset=tiny_dataset,
                            optimizers=(opt, None), recipe=lisa())
    with pytest.raises(RecipeError, match="every layer must be in the optimizer"):
        trainer.train()


def test_unpatch_after_training_restores_flags_and_keeps_the_training(tmp_path, model6_state, tiny_dataset):
    trainer, _ = run(tmp_path, tiny_dataset, lisa(interval=1, always_train=["lm_head"]), 2,
                     model=fresh_model6(model6_state))
    model = trainer.memkit.unpatch()
    assert all(p.requires_grad for p in model.parameters())
    assert not torch.equal(model.lm_head.weight, model6_state["lm_head.weight"])  # trained in place, kept
    assert torch.equal(model.model.embed_tokens.weight, model6_state["model.embed_tokens.weight"])  # frozen
