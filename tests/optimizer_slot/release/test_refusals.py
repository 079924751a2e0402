"""What gradient release refuses, each error naming the problem and the fix; the config fields; the estimate."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hf_memkit import RecipeError, load_recipe, registry
from hf_memkit.technique import ValidationContext
from tests.conftest import make_args


def technique(name, **cfg):
    entry = registry.get(name, "optimizer")
    return entry.technique_cls(entry.config_cls(gradient_release=True, **cfg))


def validate(recipe_dict):
    recipe = load_recipe(recipe_dict)
    ctx = ValidationContext(recipe, training_args=dict(recipe.training_args))
    for t in recipe.build():
        t.validate(ctx)


RELEASE = {"optimizer": {"adamw": {"gradient_release": True}}}


def test_supporting_optimizers_declare_the_fields_and_default_off():
    for name in ("adamw", "adamw_8bit", "cosmos", "fira", "sst"):
        config = registry.get(name, "optimizer").config_cls()
        assert config.gradient_release is False and config.release_clipping == "per_parameter", name
    with pytest.raises(RecipeError, match="release_clipping"):
        load_recipe({"optimizer": {"adamw": {"gradient_release": True, "release_clipping": "global"}}})
    validate(RELEASE)  # fine on its own


def test_sst_refuses_and_says_why():
    with pytest.raises(RecipeError) as err:
        validate({"optimizer": {"sst": {"gradient_release": True}}})
    text = str(err.value)
    assert "optimizer.sst.gradient_release" in text and "epilogue" in text and "re-SVD" in text
    assert "gradient_release: false" in text and "adamw" in text


def test_fp16_is_refused():
    with pytest.raises(RecipeError) as err:
        validate({**RELEASE, "training_args": {"fp16": True}})
    assert "fp16" in str(err.value) and "GradScaler" in str(err.value) and "bf16" in str(err.value)
    with pytest.raises(RecipeError, match="GradScaler"):  # the run's real arguments, checked at attach
        technique("adamw").bind_trainer(SimpleNamespace(args=SimpleNamespace(fp16=True, max_grad_norm=0.0)))


@pytest.mark.parametrize("extra,engine", [
    ({"training_args": {"fsdp": "full_shard"}}, "FSDP"),
    ({"training_args": {"deepspeed": {"zero_optimization": {"stage": 2}}}}, "ZeRO-2"),
])
def test_distributed_engines_in_the_recipe_are_refused(extra, engine):
    with pytest.raises(RecipeError) as err:
        validate({**RELEASE, **extra})
    text = str(err.value)
    assert engine in text and "all-reduce" in text and "one process" in text


def test_ddp_ranks_are_refused_at_attach(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    trainer = SimpleNamespace(args=make_args(tmp_path, max_grad_norm=0.0))
    with pytest.raises(RecipeError, match="DDP.*all-reduce"):
        technique("adamw").bind_trainer(trainer)


def test_refuse_clipping_names_the_fix():
    with pytest.raises(RecipeError) as err:
        validate({"optimizer": {"fira": {"gradient_release": True, "release_clipping": "refuse"}},
                  "training_args": {"max_grad_norm": 1.0}})
    text = str(err.value)
    assert "optimizer.fira.release_clipping" in text and "--max_grad_norm 0" in text and "per_parameter" in text
    validate({"optimizer": {"fira": {"gradient_release": True, "release_clipping": "refuse"}},
              "training_args": {"max_grad_norm": 0.0}})


def test_divergence_guard_skip_is_refused_stop_is_fine():
    with pytest.raises(RecipeError) as err:
        validate({**RELEASE, "guard": [{"divergence_guard": {"action": "skip"}}]})
    assert "action: skip" in str(err.value) and "action: stop" in str(err.value)
    validate({**RELEASE, "guard": [{"divergence_guard": {"action": "stop"}}]})


def test_accumulation_without_a_trainer_is_refused(tiny_model, tmp_path):
    t = technique("adamw")
    args = make_args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.0)
    optimizer = t.create_optimizer(tiny_model, args)
    with pytest.raises(RecipeError, match="last micro-batch"):
        t.wrap_optimizer(optimizer, tiny_model, args)


def test_estimate_counts_one_gradient_alive(tiny_path):
    from transformers import AutoConfig

    from hf_memkit.memory.estimate import estimate_memory

    config = AutoConfig.from_pretrained(tiny_path)
    for name in ("adamw", "adamw_8bit", "cosmos", "fira"):
        plain = estimate_memory(config, {"optimizer": {name: {}}})
        released = estimate_memory(config, {"optimizer": {name: {"gradient_release": True}}})
        largest = max(p.numel for p in plain.trainable())
        assert released.categories()["gradients"] == 4 * largest < plain.categories()["gradients"] / 4, name
        others = {k: v for k, v in released.categories().items() if k != "gradients"}
        assert others == {k: v for k, v in plain.categories().items() if k != "gradients"}, name
