"""sparse_update through the Trainer on a 6-layer tiny Llama: the update set, channel counts, memory, saving."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from hf_memkit import MemkitTrainer
from hf_memkit.memory.report import MEASURED
from hf_memkit.schedules.sparse_update.linear import SLICE, select_channels
from tests.conftest import make_args, measure_one_step
from tests.schedules.conftest import fresh_model6, six_layer_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def sparse(**kw):
    return {"schedule": [{"sparse_update": kw}]}


class GradRecorder(TrainerCallback):
    def __init__(self):
        self.grads: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: (tuple(p.grad.shape), p.grad.untyped_storage().nbytes())
                           for n, p in model.named_parameters() if p.grad is not None})


def train(tmp_path, dataset, recipe, steps=1, model=None, **args):
    rec = GradRecorder()
    trainer = MemkitTrainer(model=model or six_layer_model(), args=make_args(tmp_path, max_steps=steps, **args),
                            train_dataset=dataset, callbacks=[rec], recipe=recipe)
    trainer.train()
    return trainer, rec


def test_gradients_exist_only_for_the_update_set(tmp_path, tiny_dataset):
    trainer, rec = train(tmp_path, tiny_dataset, sparse())  # defaults: norms of 2 layers, 1/4 channels of the last
    norms = {f"model.layers.{i}.{n}.weight" for i in (4, 5) for n in ("input_layernorm", "post_attention_layernorm")}
    slices = {f"model.layers.5.{m}.{SLICE}" for m in LINEARS}
    (grads,) = rec.grads
    assert set(grads) == norms | {"model.norm.weight"} | slices
    model = trainer.model
    for m in LINEARS:
        lin = model.get_submodule(f"model.layers.5.{m}")
        assert lin.weight.grad is None and not lin.weight.requires_grad
        k = int(0.25 * lin.in_features)
        shape, nbytes = grads[f"model.layers.5.{m}.{SLICE}"]
        assert shape == (lin.out_features, k) and nbytes == lin.out_features * k * 4  # no full-size gradient


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_updated_channels_are_the_top_l2_ones_and_count_int_ratio_c_in(ratio, tmp_path, tiny_dataset, model6_state):
    trainer, _ = train(tmp_path, tiny_dataset, sparse(bias_layers=0, weight_layers=[-2], weight_ratio=ratio),
                       steps=2)
    state = trainer.model.state_dict()  # the save hook folds the slices into the weights
    assert set(state) == set(model6_state)  # and the checkpoint layout is the plain model's
    for m in LINEARS:
        name = f"model.layers.4.{m}.weight"
        before, after = model6_state[name], state[name]
        changed = (before != after).any(dim=0).nonzero().flatten()
        assert len(changed) == int(ratio * before.shape[1]), m
        assert torch.equal(changed, select_channels(before, int(ratio * before.shape[1]))), m
    untouched = [n for n in model6_state if ".layers.4." not in n]
    assert all(torch.equal(state[n], model6_state[n]) for n in untouched)


ESTIMATE_CASES = {
    "default": sparse(),
    "int8": sparse(quantized="int8"),
    "down_proj_of_layer_4": sparse(bias_layers=0, weight_layers=[4], weight_modules=["mlp.down_proj"]),
    "ratio_1_and_half": sparse(bias_layers=1, weight_layers=[-1, -3], weight_ratio=[1.0, 0.5]),
    "adamw_8bit_checkpointing": {**sparse(), "optimizer": {"adamw_8bit": {}},
                                 "training_args": {"gradient_checkpointing": True}},
}


@pytest.mark.parametrize("name", list(ESTIMATE_CASES))
def test_estimate_matches_measurement(name, tmp_path, tiny_dataset):
    est, measured = measure_one_step(six_layer_model(), tiny_dataset, ESTIMATE_CASES[name], tmp_path)
    for cat in MEASURED:
        assert est.get(cat, 0) == pytest.approx(measured[cat], rel=0.02, abs=256), cat


def test_estimate_matches_hand_computed_bytes(tmp_path, tiny_dataset):
    """1/4 of down_proj's 128 input channels in the last layer, batch 4 x 32 tokens, fp32, stock AdamW:
    slice 64x32 -> 8 kB (+ 256 B of indices), its gradient 8 kB, two moments 16 kB; saved: the 32 selected
    channels (16 kB), the final norm's fp32 input + 1/rms (128 x 260 B) and the labels (1 kB); layers 0-4 and
    the attention of layer 5 save nothing (nothing below needs a gradient)."""
    recipe = sparse(bias_layers=0, weight_layers=[-1], weight_modules=["mlp.down_proj"], weight_ratio=0.25)
    est, measured = measure_one_step(six_layer_model(), tiny_dataset, recipe, tmp_path)
    from hf_memkit.memory.profiler import parameter_bytes

    base = parameter_bytes(six_layer_model())["weights"]  # parameters + buffers of the unpatched model
    assert est["weights"] - base == 8192 + 256 == measured["weights"] - base
    assert est["gradients"] == 8192 == measured["gradients"]
    assert est["optimizer_states"] == 16384 and measured["optimizer_states"] == 16384 + 4  # + AdamW's step
    assert est["activations"] == 16384 + 128 * 260 + 1024 == measured["activations"] - 8  # 8: the loss scalar


def test_int8_trains_the_slice_and_folds_the_quantized_layer(tmp_path, tiny_dataset, model6_state):
    from hf_memkit.schedules.sparse_update.quantize import dequantize, quantize_per_channel

    # Adam's step is ~lr per element whatever the gradient scale: lr=1 moves the int8 units by about one step
    trainer, rec = train(tmp_path, tiny_dataset, sparse(bias_layers=0, quantized="int8"), steps=2,
                         model=fresh_model6(model6_state), learning_rate=1.0)
    lin = trainer.model.get_submodule("model.layers.5.mlp.down_proj")
    q, s = quantize_per_channel(model6_state["model.layers.5.mlp.down_proj.weight"])
    assert torch.equal(lin.sparse_update_qweight, q) and all(g for g in rec.grads)
    folded = trainer.model.state_dict()["model.layers.5.mlp.down_proj.weight"]
    q_new = torch.round(folded / s[:, None])
    assert torch.allclose(folded, dequantize(q_new.to(torch.int8), s))  # the saved layer is an int8 layer
    assert (q_new != q).any()  # and training moved some integers


def test_unpatch_keeps_the_training_and_restores_plain_linears(tmp_path, tiny_dataset):
    trainer, _ = train(tmp_path, tiny_dataset, sparse(bias_layers=0), steps=2)
    folded = trainer.model.state_dict()
    model = trainer.memkit.unpatch()
    lin = model.get_submodule("model.layers.5.mlp.down_proj")
    assert "forward" not in vars(lin) and not hasattr(lin, SLICE) and not hasattr(lin, "sparse_update_index")
    for n, v in model.state_dict().items():
        assert torch.equal(v, folded[n]), n
    assert all(p.requires_grad for p in model.parameters())


def test_save_model_writes_a_plain_checkpoint(tmp_path, tiny_dataset):
    from transformers import AutoModelForCausalLM

    trainer, _ = train(tmp_path / "run", tiny_dataset, sparse(), steps=1)
    trainer.save_model(str(tmp_path / "out"))
    loaded, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = trainer.model.state_dict()
    for n, v in loaded.state_dict().items():
        assert torch.equal(v, expected[n]), n


@pytest.mark.slow
def test_budget_mode_plans_within_the_budget_and_resumes_with_the_same_plan(tmp_path, tiny_dataset, model6_state):
    mb = 1.0
    recipe = sparse(budget={"mb": mb, "batches": 2})
    args = dict(save_strategy="steps", save_steps=1)
    from hf_memkit.memory.profiler import MemoryReportCallback

    prof = MemoryReportCallback()
    first = MemkitTrainer(model=fresh_model6(model6_state), args=make_args(tmp_path, max_steps=2, **args),
                          train_dataset=tiny_dataset, callbacks=[prof], recipe=recipe)
    first.train()
    plan = first.memkit.techniques[0].plan
    assert plan is not None and (plan.bias_layers or plan.channels)
    m = prof.report()
    from hf_memkit.memory.profiler import parameter_bytes

    base_weights = parameter_bytes(six_layer_model())["weights"]
    update = m["gradients"] + m["optimizer_states"] + (m["weights"] - base_weights) + m["activations"] - 1032
    assert update <= mb * 2**20, update  # what the update costs stays within the budget

    resumed = MemkitTrainer(model=fresh_model6(model6_state), args=make_args(tmp_path, max_steps=2, **args),
                            train_dataset=tiny_dataset, recipe=recipe)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.memkit.techniques[0].plan == plan
    for (n, p), q in zip(first.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
