"""``MemkitCallback``: schedule, compress/export and guard techniques on a *stock* ``transformers.Trainer``."""

from __future__ import annotations

import json

import pytest
import torch

from hf_memkit import MemkitCallback, RecipeError
from hf_memkit.errors import DivergenceError

from ..conftest import make_args


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


class StepWatch:
    """Per optimizer step: which decoder layers' parameters changed, and LISA's active set at that step."""

    def __init__(self, lisa):
        from transformers import TrainerCallback

        watch = self
        self.steps: list[tuple[list[int], set[int]]] = []

        class Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kw):
                watch.before = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_step_end(self, args, state, control, model=None, **kw):
                changed = {_layer_of(n) for n, p in model.named_parameters()
                           if _layer_of(n) is not None and not torch.equal(p, watch.before[n])}
                watch.steps.append((lisa.active_layers, changed))

        self.callback = Cb()


def test_stock_trainer_runs_lisa_and_exports_gptq_at_the_end(tiny_model, tiny_dataset, tmp_path):
    from transformers import Trainer

    recipe = {"schedule": [{"lisa": {"active_layers": 1, "interval": 1, "seed": 3}}],
              "compress": [{"gptq": {"num_samples": 8, "seq_len": 32, "group_size": 32}}]}
    cb = MemkitCallback(recipe)
    lisa = cb.runtime.of_slot("schedule")
    watch = StepWatch(lisa)
    trainer = Trainer(model=tiny_model, args=make_args(tmp_path, max_steps=4), train_dataset=tiny_dataset,
                      callbacks=[cb, watch.callback])
    trainer.train()
    assert len(watch.steps) == 4
    for active, changed in watch.steps:  # only the γ active layers train at each step
        assert len(active) == 1 and changed == set(active), watch.steps
    assert len({tuple(a) for a, _ in watch.steps}) == 2, "the active layer was never re-drawn"
    # the optimizer holds no state for the layer that is not active now
    inactive = [p for n, p in tiny_model.named_parameters() if _layer_of(n) not in (None, *lisa.active_layers)]
    assert inactive and all(not trainer.optimizer.state.get(p) for p in inactive)

    export = tmp_path / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert report["techniques"] == ["gptq"] and report["stage"] == "after"
    assert all(not p.isnan().any() for p in tiny_model.parameters())  # the trainer's model keeps its weights


def test_refused_techniques_are_named_with_the_way_that_works():
    with pytest.raises(RecipeError) as err:
        MemkitCallback({"loss": {"cce": {}}})
    text = str(err.value)
    assert "MemkitCallback cannot apply cce (loss): a callback cannot replace Trainer.compute_loss" in text
    assert "MemkitTrainer" in text and "apply_recipe" in text
    with pytest.raises(RecipeError) as err:
        MemkitCallback({"optimizer": {"adamw_8bit": {}}, "adapter": {"lora": {}}, "activations": [{"mesa": {}}],
                        "guard": [{"divergence_guard": {}}], "training_args": {"max_steps": 3}})
    text = str(err.value)
    for name in ("adamw_8bit (optimizer)", "lora (adapter)", "mesa (activations)", "training_args (max_steps)"):
        assert name in text, text
    assert "divergence_guard" not in text
    with pytest.raises(RecipeError, match=r"e2e_qp \(compress\): this compress list quantizes before training"):
        MemkitCallback({"compress": [{"rtn": {}}, {"e2e_qp": {}}]})
    with pytest.raises(RecipeError, match="unknown technique 'lsia'"):
        MemkitCallback({"schedule": [{"lsia": {}}]})


def test_guard_stops_a_stock_run_on_nan_gradients(tiny_model, tiny_dataset, tmp_path):
    from transformers import Trainer

    with torch.no_grad():
        tiny_model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    trainer = Trainer(model=tiny_model, args=make_args(tmp_path), train_dataset=tiny_dataset,
                      callbacks=[MemkitCallback({"guard": [{"divergence_guard": {}}]})])
    with pytest.raises(DivergenceError, match="diverged at step 1"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_guard_sees_logged_losses():
    from transformers import TrainerControl, TrainerState

    cb = MemkitCallback({"guard": [{"divergence_guard": {"spike_factor": 4.0}}]})
    state, control = TrainerState(), TrainerControl()
    for step, loss in enumerate([5.0, 4.8, 4.9], start=1):
        state.global_step = step
        cb.on_log(None, state, control, logs={"loss": loss})
        cb.on_step_end(None, state, control)
    state.global_step = 4
    with pytest.raises(DivergenceError, match=r"diverged at step 4: the loss 50 is 10.\dx the running median"):
        cb.on_log(None, state, control, logs={"loss": 50.0})


def test_memory_report_and_unpatch(tiny_model, tiny_dataset, tmp_path):
    from transformers import Trainer

    cb = MemkitCallback({"schedule": [{"lisa": {"active_layers": 1}}]}, memory_report=True)
    trainer = Trainer(model=tiny_model, args=make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset)
    trainer.add_callback(cb)  # added after the Trainer was built: patched at train begin
    trainer.train()
    measured = json.loads((tmp_path / "memory_report.json").read_text())["measured"]
    assert measured["gradients"] > 0 and measured["optimizer_states"] > 0 and len(measured["timeline"]) == 1
    assert not all(p.requires_grad for p in tiny_model.parameters())
    assert cb.unpatch() is tiny_model and all(p.requires_grad for p in tiny_model.parameters())
    with pytest.raises(RecipeError, match="already applied to another Trainer"):
        cb2 = MemkitCallback({"schedule": [{"lisa": {"active_layers": 1}}]})
        Trainer(model=tiny_model, args=make_args(tmp_path), callbacks=[cb2])
        cb2.on_init_end(trainer.args, trainer.state, trainer.control, model=torch.nn.Linear(1, 1))
