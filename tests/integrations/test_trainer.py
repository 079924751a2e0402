"""The Trainer wiring: MemkitTrainer, apply_recipe/detach, training_args, loss and extra-loss hooks,
technique state in checkpoints, export."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from pydantic import Field
from transformers import Trainer, TrainerCallback

from hf_memkit import CheckpointError, MemkitTrainer, RecipeError, Technique, TechniqueConfig, apply_recipe, registry
from hf_memkit.integrations.trainer import detach
from tests.conftest import make_args


class CountingConfig(TechniqueConfig):
    offset: float = Field(0.0, description="constant added to the loss")


class _Count(TrainerCallback):
    def __init__(self, owner):
        self.owner = owner

    def on_step_end(self, args, state, control, **kw):
        self.owner.steps += 1
        self.owner.trace = torch.cat([self.owner.trace, torch.tensor([float(state.global_step)])])


class CountingSchedule(Technique):
    """A stateful test technique: counts steps through a callback and adds `offset` to the loss."""

    name: ClassVar[str] = "counting_schedule"
    slot: ClassVar[str] = "schedule"
    config_cls = CountingConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.steps = 0
        self.trace = torch.zeros(0)

    def callbacks(self):
        return [_Count(self)]

    def extra_loss(self, model, inputs, outputs):
        return torch.tensor(self.config.offset) if self.config.offset else None

    def state_dict(self):
        return {"steps": self.steps, "trace": self.trace}

    def load_state_dict(self, state):
        self.steps = state["steps"]
        self.trace = state["trace"].clone()


class ManualCE(Technique):
    """A loss-slot test technique: plain PyTorch shifted cross-entropy from the logits."""

    name: ClassVar[str] = "manual_ce"
    slot: ClassVar[str] = "loss"
    config_cls = TechniqueConfig
    calls = 0

    def loss(self, model, inputs, num_items_in_batch=None, return_outputs=False):
        type(self).calls += 1
        outputs = model(input_ids=inputs["input_ids"])
        logits = outputs.logits[:, :-1].float()
        labels = inputs["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return (loss, outputs) if return_outputs else loss


@pytest.fixture
def test_techniques():
    registry.register_technique(CountingSchedule)
    registry.register_technique(ManualCE)
    yield
    registry.unregister_technique("counting_schedule")
    registry.unregister_technique("manual_ce")


def test_memkit_trainer_reads_recipe_from_memkit_training_arguments(tiny_model, tiny_dataset, tmp_path):
    from hf_memkit import MemkitTrainingArguments

    path = tmp_path / "r.yaml"
    path.write_text("memkit: 1\noptimizer: {adamw_8bit: {}}\nadapter: {lora: {r: 2}}\n")
    args = MemkitTrainingArguments(output_dir=str(tmp_path / "o"), memkit_recipe=str(path), max_steps=1,
                                   report_to=[], disable_tqdm=True)
    trainer = MemkitTrainer(model=tiny_model, args=args, train_dataset=tiny_dataset)
    trainer.train()
    assert type(trainer.model).__name__ == "PeftModelForCausalLM"
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"


def test_recipe_training_args_are_applied(tiny_model, tiny_dataset, tmp_path):
    recipe = {"training_args": {"gradient_checkpointing": True, "gradient_accumulation_steps": 2}}
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path), train_dataset=tiny_dataset, recipe=recipe)
    assert trainer.args.gradient_checkpointing and trainer.args.gradient_accumulation_steps == 2
    assert getattr(trainer.args, "activation_checkpointing", True)
    trainer.train()
    assert tiny_model.is_gradient_checkpointing if hasattr(tiny_model, "is_gradient_checkpointing") else True


def test_apply_recipe_to_existing_trainer_and_detach(tiny_model, tiny_dataset, tmp_path):
    trainer = Trainer(model=tiny_model, args=make_args(tmp_path, max_steps=2), train_dataset=tiny_dataset)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_recipe(trainer, {"optimizer": {"adamw_8bit": {}}, "adapter": {"lora": {"r": 4}},
                           "training_args": {"gradient_accumulation_steps": 2}})
    assert trainer.args.gradient_accumulation_steps == 2
    with pytest.raises(RecipeError, match="already has a recipe"):
        apply_recipe(trainer, {})
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    # 2 steps x 4 samples x 2 accumulated micro-batches out of 64 blocks: the recipe's accumulation ran
    assert trainer.state.epoch == pytest.approx(16 / 64)
    detach(trainer)
    assert trainer.model is tiny_model
    assert "compute_loss" not in vars(trainer) and "train" not in vars(trainer)
    after = tiny_model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_optimizer_given_to_trainer_conflicts_with_recipe(tiny_model, tiny_dataset, tmp_path):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    with pytest.raises(RecipeError, match="optimizer"):
        MemkitTrainer(model=tiny_model, args=make_args(tmp_path), train_dataset=tiny_dataset,
                      optimizers=(opt, None), recipe={"optimizer": {"adamw": {}}})
    trainer = Trainer(model=tiny_model, args=make_args(tmp_path), train_dataset=tiny_dataset, optimizers=(opt, None))
    with pytest.raises(RecipeError, match="optimizer"):
        apply_recipe(trainer, {"optimizer": {"adamw": {}}})


def test_bad_training_args_value_names_the_key(tiny_model, tiny_dataset, tmp_path):
    with pytest.raises(RecipeError, match="training_args"):
        MemkitTrainer(model=tiny_model, args=make_args(tmp_path), train_dataset=tiny_dataset,
                      recipe={"training_args": {"load_best_model_at_end": True, "eval_strategy": "steps",
                                                     "save_strategy": "epoch"}})


def test_loss_slot_technique_replaces_the_loss(test_techniques, tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    stock = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=make_args(tmp_path / "a"),
                    train_dataset=tiny_dataset)
    ours = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=make_args(tmp_path / "b"),
                         train_dataset=tiny_dataset, recipe={"loss": {"manual_ce": {}}})
    ManualCE.calls = 0
    a, b = stock.train(), ours.train()
    assert ManualCE.calls == 2
    assert b.training_loss == pytest.approx(a.training_loss, rel=1e-5)


def test_extra_loss_terms_are_added(test_techniques, tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    runs = []
    for offset in (0.0, 1.5):
        t = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path),
                          args=make_args(tmp_path / str(offset), max_steps=1), train_dataset=tiny_dataset,
                          recipe={"schedule": [{"counting_schedule": {"offset": offset}}]})
        runs.append(t.train().training_loss)
    assert runs[1] == pytest.approx(runs[0] + 1.5, rel=1e-5)


def test_technique_state_is_checkpointed_and_restored(test_techniques, tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {"schedule": [{"counting_schedule": {}}], "adapter": {"lora": {"r": 2}}}
    args = make_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
    t1 = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args,
                       train_dataset=tiny_dataset, recipe=recipe)
    t1.train()
    meta = json.loads((tmp_path / "checkpoint-2" / "memkit_state" / "state.json").read_text())
    assert meta["techniques"]["counting_schedule"]["steps"] == 2
    assert meta["recipe"]["schedule"] == [{"counting_schedule": {"offset": 0.0}}]

    longer = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    t2 = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=longer,
                       train_dataset=tiny_dataset, recipe=recipe)
    t2.train(resume_from_checkpoint=True)  # picks checkpoint-3, the last one, and runs step 4
    counter = t2.memkit.of_slot("schedule")
    assert counter.steps == 4  # 3 restored + 1 new step
    assert torch.equal(counter.trace, torch.tensor([1.0, 2.0, 3.0, 4.0]))

    t3 = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args,
                       train_dataset=tiny_dataset, recipe=recipe)
    t3.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    counter = t3.memkit.of_slot("schedule")
    assert counter.steps == 3 and torch.equal(counter.trace, torch.tensor([1.0, 2.0, 3.0]))


def test_resume_errors_are_clear(test_techniques, tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {"schedule": [{"counting_schedule": {}}]}
    args = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args, train_dataset=tiny_dataset,
                  recipe=recipe).train()
    ckpt = tmp_path / "checkpoint-1"

    def fresh(r):
        return MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args,
                             train_dataset=tiny_dataset, recipe=r)

    with pytest.raises(CheckpointError, match="techniques"):
        fresh({"schedule": [{"counting_schedule": {}}], "optimizer": {"adamw": {}}}).train(str(ckpt))
    (ckpt / "memkit_state" / "tensors.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        fresh(recipe).train(str(ckpt))
    import shutil

    shutil.rmtree(ckpt / "memkit_state")
    with pytest.raises(CheckpointError, match="no memkit_state"):
        fresh(recipe).train(str(ckpt))
    empty = tmp_path / "empty"
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=make_args(empty),
                      train_dataset=tiny_dataset, recipe=recipe).train(resume_from_checkpoint=True)


def test_export_writes_a_merged_plain_hf_model(tiny_model, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {"adapter": {"lora": {"r": 4}}, "export": {"format": "safetensors"}}
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=2), train_dataset=tiny_dataset,
                            recipe=recipe)
    trainer.train()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not any("lora" in n for n, _ in exported.named_parameters())
    x = torch.randint(0, 500, (1, 10))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x).logits, trainer.model(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)


def test_model_init_without_model_is_rejected_when_the_recipe_patches(tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    def init():
        return AutoModelForCausalLM.from_pretrained(tiny_path)

    with pytest.raises(RecipeError, match="model_init"):
        MemkitTrainer(model_init=init, args=make_args(tmp_path), train_dataset=tiny_dataset,
                      recipe={"adapter": {"lora": {}}})
    # an optimizer-only recipe patches nothing, so model_init stays usable
    trainer = MemkitTrainer(model_init=init, args=make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset,
                            recipe={"optimizer": {"adamw_8bit": {}}})
    assert trainer.train().global_step == 1
