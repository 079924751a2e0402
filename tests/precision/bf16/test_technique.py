"""The recipe technique ``precision: {bf16: {...}}``: config, refusals, memory estimate, state, loading in 16 bits."""

from __future__ import annotations

import pytest
import torch

from hf_memkit import RecipeError, estimate_memory, load_recipe, registry
from hf_memkit.errors import CheckpointError
from hf_memkit.precision.bf16.config import Bf16Config
from hf_memkit.precision.bf16.loading import load_dtype
from hf_memkit.precision.bf16.optimizer import RoundingRNG
from hf_memkit.precision.bf16.technique import Bf16Technique


def test_registered_in_the_precision_slot():
    entry = registry.get("bf16", "precision")
    assert entry is not None and entry.technique_cls is Bf16Technique and registry.SLOTS["precision"] is False
    recipe = load_recipe({"precision": {"bf16": {"update": "kahan"}}})
    assert recipe.get("bf16").config.update == "kahan"
    assert load_recipe(recipe.to_yaml()).to_dict() == recipe.to_dict()


def test_config_defaults_and_errors():
    cfg = Bf16Config()
    assert (cfg.dtype, cfg.update, cfg.seed, cfg.skip_modules) == ("bfloat16", "stochastic", None, [])
    with pytest.raises(RecipeError, match="update"):
        load_recipe({"precision": {"bf16": {"update": "round"}}})
    with pytest.raises(RecipeError, match="dtype"):
        load_recipe({"precision": {"bf16": {"dtype": "float8"}}})
    with pytest.raises(RecipeError, match="seed"):
        load_recipe({"precision": {"bf16": {"seed": -1}}})


@pytest.mark.parametrize("other", [{"activations": [{"mesa": {}}]}, {"activations": [{"wta_crs": {}}]},
                                   {"schedule": [{"sparse_update": {}}]}, {"optimizer": {"sst": {}}},
                                   {"optimizer": {"ast": {}}}, {"compress": [{"e2e_qp": {}}]},
                                   {"training_args": {"fp16": True}}])
def test_pairs_that_cannot_work_are_refused_by_name(other):
    with pytest.raises(RecipeError, match="bf16"):
        load_recipe({"precision": {"bf16": {}}, **other})


def test_deepspeed_and_fsdp_are_refused():
    with pytest.raises(RecipeError, match="optimizer"):
        load_recipe({"precision": {"bf16": {}}, "distributed": {"fsdp": {}}})


def test_load_dtype_and_loading_without_an_fp32_copy(tiny_path):
    from hf_memkit.data.models import load_model_and_tokenizer

    assert load_dtype("bf16_full") is torch.bfloat16
    assert load_dtype({"precision": {"bf16": {"dtype": "float16"}}}) is torch.float16
    assert load_dtype({"optimizer": {"adamw": {}}}) is None and load_dtype(None) is None
    model, _ = load_model_and_tokenizer(str(tiny_path), dtype=load_dtype("bf16_full"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_estimate_counts_16_bit_weights_gradients_and_kahan():
    plain = estimate_memory("tiny", {"optimizer": {"adamw": {}}}, batch_size=2, seq_len=16).categories()
    sr = estimate_memory("tiny", {"optimizer": {"adamw": {}}, "precision": {"bf16": {}}},
                         batch_size=2, seq_len=16).categories()
    kahan = estimate_memory("tiny", {"optimizer": {"adamw": {}}, "precision": {"bf16": {"update": "kahan"}}},
                            batch_size=2, seq_len=16).categories()
    from transformers import LlamaForCausalLM

    from hf_memkit.data.models import tiny_config

    cfg = tiny_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    stored = sum(m.weight.numel() for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Embedding))
    assert plain["weights"] - sr["weights"] == stored * 2
    assert plain["gradients"] - sr["gradients"] == stored * 2
    assert kahan["optimizer_states"] - sr["optimizer_states"] == stored * 2
    assert sr["precision_buffers"] >= cfg.vocab_size * cfg.hidden_size * 8  # fp32 weight + gradient in the step


@pytest.mark.parametrize("recipe", [
    {"optimizer": {"adamw": {}}, "precision": {"bf16": {"update": "kahan"}}},
    {"adapter": {"lora": {"r": 4}}, "precision": {"bf16": {}}},
    {"loss": {"cce": {}}, "optimizer": {"adamw_8bit": {}}, "precision": {"bf16": {}}},
], ids=["kahan", "lora", "cce_8bit"])
def test_estimate_matches_measurement_within_15_percent(recipe, tiny_model, tiny_dataset, tmp_path):
    from hf_memkit.memory.report import MEASURED, comparable_total
    from tests.conftest import measure_one_step

    est, measured = measure_one_step(tiny_model, tiny_dataset, load_recipe(recipe), tmp_path)
    for cat in MEASURED:
        assert est.get(cat, 0) == pytest.approx(measured[cat], rel=0.15, abs=1024), cat
    assert comparable_total(est) == pytest.approx(comparable_total(measured), rel=0.15)


def test_state_round_trip_and_corrupt_states():
    t = Bf16Technique()
    assert t.state_dict() == {}  # nothing drawn yet
    t.rng = RoundingRNG(5)
    torch.rand(3, generator=t.rng.on(torch.device("cpu")))
    state = t.state_dict()
    assert state["format"] == 1 and state["seed"] == 5 and state["rng/cpu"].dtype == torch.uint8
    again = Bf16Technique()
    again.load_state_dict(state)
    gen_a, gen_b = t.rng.on(torch.device("cpu")), again.rng.on(torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=gen_a), torch.rand(4, generator=gen_b))
    for bad in ({**state, "format": 2}, {**state, "seed": -3}, {**state, "rng/cpu": torch.zeros(3)},
                {**state, "rng/cpu": torch.zeros(7, dtype=torch.uint8)}, {**state, "extra": 1},
                {k: v for k, v in state.items() if k != "seed"}):
        with pytest.raises(CheckpointError):
            Bf16Technique().load_state_dict(bad)


def test_memkit_callback_refuses_the_precision_slot():
    from hf_memkit.integrations.callback import callback_refusals

    refusals = callback_refusals(load_recipe({"precision": {"bf16": {}}}))
    assert refusals and refusals[0].startswith("bf16 (precision)")


def test_selected_by_the_memkit_precision_flag(tmp_path):
    from transformers import HfArgumentParser

    from hf_memkit.integrations.memkit_trainer import MemkitTrainingArguments

    (args,) = HfArgumentParser(MemkitTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--memkit_recipe", "bf16_full", "--memkit_precision", "bf16: {update: kahan}",
         "--memkit_set", "bf16.seed=7", "--report_to", "none"])
    recipe = args.memkit_resolved_recipe()
    assert recipe.get("bf16").config.update == "kahan" and recipe.get("bf16").config.seed == 7
    assert recipe.get("cce") is not None
