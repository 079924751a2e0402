"""The measured side: saved-activation accounting exact on hand-checkable modules, and the estimator agreeing
with the measurement on the tiny Llama for the bundled recipes."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.memory.profiler import SavedTensorMeter, storage_bytes
from tests.conftest import measure_one_step


def test_linear_gelu_stack_saved_bytes_are_exact():
    torch.manual_seed(0)
    n, d_in, d_hidden, d_out = 5, 7, 11, 3
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.GELU(), torch.nn.Linear(d_hidden, d_out))
    x = torch.randn(n, d_in, requires_grad=True)
    meter = SavedTensorMeter(model)
    with meter.measure():
        y = model(x).sum()
    # Linear 1 saves x (n x d_in); GELU saves its input (n x d_hidden); Linear 2 saves GELU's output
    # (n x d_hidden); weights are parameters and are not activations
    assert meter.bytes["activations"] == 4 * (n * d_in + 2 * n * d_hidden)
    y.backward()


def test_frozen_weights_save_no_inputs_and_shared_storage_counts_once():
    lin = torch.nn.Linear(8, 8)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    meter = SavedTensorMeter(lin)
    with meter.measure():
        lin(x)  # frozen weight: the input gradient needs only W, so x is not saved
        (x * x).sum()  # x saved twice by one op: one storage
    assert meter.bytes["activations"] == 4 * 4 * 8
    assert storage_bytes([x, x.view(32), x[1:]]) == 4 * 32


def test_a_gradient_formed_in_the_forward_is_counted_once_as_the_gradient():
    """The fused cross-entropy forms lm_head's dC in its forward; backward hands that very buffer to autograd, so
    it becomes ``.grad``. The meter leaves it to the gradient accounting; a dC that does not become a leaf's
    ``.grad`` (a non-leaf classifier, as LoRA on lm_head builds) stays a saved activation."""
    from hf_memkit.ops.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    n, d, v = 16, 8, 300
    head = torch.nn.Linear(d, v, bias=False)
    e = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, v, (n,))
    meter = SavedTensorMeter(head)
    with meter.measure():
        linear_cross_entropy(e, head.weight, y)
    assert meter.bytes["activations"] == 4 * n * d  # dE only

    ptrs = []  # (hooks do not nest: the innermost pair alone sees the saved tensors)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ptrs.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        loss = linear_cross_entropy(e, head.weight, y)
    loss.backward()
    assert head.weight.grad.untyped_storage().data_ptr() in ptrs  # the saved dC is the gradient's storage
    expected = torch.nn.functional.cross_entropy(e.detach() @ head.weight.detach().T, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    c = head.weight * 1.0  # not a leaf: its gradient flows on into head.weight.grad, a new buffer
    meter = SavedTensorMeter(head)
    with meter.measure():
        linear_cross_entropy(e, c, y)
    assert meter.bytes["activations"] == 4 * n * d + 4 * v * d


def test_logits_are_routed_by_vocabulary_size():
    v = 13
    logits = torch.randn(6, v, requires_grad=True)
    meter = SavedTensorMeter(torch.nn.Linear(1, 1), vocab_size=v)
    with meter.measure():
        torch.nn.functional.cross_entropy(logits, torch.randint(0, v, (6,)))
    assert meter.bytes["logits"] == 6 * v * 4  # log_softmax output


RECIPES = ["baseline", "full_8bit", "lora", "qlora", "default"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_estimate_matches_measurement_on_tiny(recipe, tiny_model, tiny_dataset, tmp_path):
    est, measured = measure_one_step(tiny_model, tiny_dataset, recipe, tmp_path)
    for cat in ("weights", "adapter_weights", "gradients", "optimizer_states", "activations", "logits"):
        assert est.get(cat, 0) == pytest.approx(measured[cat], rel=0.02, abs=64), cat
    assert measured["peak_rss_bytes"] > 0 and measured["median_step_seconds"] > 0
    assert measured["timeline"][0]["activations"] == measured["activations"]


# --- the process peak ------------------------------------------------------------------------------------------


def test_the_breakdown_sums_to_the_peak_exactly():
    from hf_memkit.memory.profiler import BREAKDOWN, process_breakdown

    parts = process_breakdown(1000, 300, {"weights": 200, "activations": 50, "transients": 25, "co2_state": 7}, 150)
    assert sum(parts.values()) == 1000 and parts["unaccounted"] == 1000 - 300 - 200 - 50 - 25 - 7 - 150
    assert list(parts)[: len(BREAKDOWN) - 2] == list(BREAKDOWN[:-2]) and "co2_state" in parts
    assert process_breakdown(10, 30, {}, 0)["unaccounted"] == -20  # a negative remainder stays visible


@pytest.fixture
def fresh_sampler():
    from hf_memkit.memory import process

    process.stop_sampler()
    yield process
    process.stop_sampler()


def test_a_profiled_step_accounts_for_the_process_peak(fresh_sampler, tiny_model, tiny_dataset, tmp_path):
    """Default recipe on the tiny model, 2 steps, the 2nd profiled, one evaluation: the profiled peak covers the
    counted tensors, the peak splits exactly, phases are sampled, and the report is strict JSON."""
    import json

    from hf_memkit import MemkitTrainer
    from hf_memkit.memory.profiler import MemoryReportCallback
    from tests.conftest import make_args

    process = fresh_sampler
    process.mark("load")
    cb = MemoryReportCallback(profile_step=2)
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=2, per_device_eval_batch_size=8),
                            train_dataset=tiny_dataset, eval_dataset=tiny_dataset.select(range(8)), callbacks=[cb],
                            recipe="default")
    process.mark("build")
    trainer.train()
    trainer.evaluate()
    rep = cb.report()
    proc = rep["process"]
    assert sum(proc["breakdown"].values()) == proc["peak_rss_bytes"] == rep["peak_rss_bytes"]
    ps = proc["peak_step"]
    assert ps["step"] == 2 and ps["peak_phase"] in ("forward", "backward", "optimizer")
    persistent = rep["weights"] + rep["adapter_weights"] + rep["optimizer_states"]
    assert ps["tensor_peak_bytes"] >= persistent + max(rep["activations"] + rep["logits"], rep["gradients"])
    assert ps["at_peak"]["transients"] > 0 and ps["analysis_seconds"] < 5
    assert {p["phase"] for p in ps["phases"]} >= {"forward", "backward", "optimizer"}
    eb = proc["eval_batch"]
    assert eb["window_peak_bytes"] > 0 and set(eb["at_peak"]) == {"transients"}
    spans = {s["phase"] for s in proc["rss_timeline"]["spans"]}
    assert {"load", "build", "forward", "backward", "optimizer", "eval"} <= spans
    assert proc["runtime"]["before_model"]["source"] == "load mark"
    assert json.loads(json.dumps(rep, allow_nan=False)) == json.loads(json.dumps(rep))


def test_profiling_can_be_switched_off(fresh_sampler, tiny_model, tiny_dataset, tmp_path):
    from hf_memkit import MemkitTrainer
    from hf_memkit.memory.profiler import MemoryReportCallback
    from tests.conftest import make_args

    cb = MemoryReportCallback(profile_step=0, profile_eval=False, sample=False, runtime=100 * 2**20)
    MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=2), train_dataset=tiny_dataset,
                  callbacks=[cb], recipe="lora").train()
    proc = cb.report()["process"]
    assert cb.peak_step is None and "peak_step" not in proc and "rss_timeline" not in proc
    assert fresh_sampler.sampler() is None  # nothing started a sampler
    assert proc["tensors_from"] == "measured maxima" and proc["breakdown"]["runtime"] == 100 * 2**20
    assert sum(proc["breakdown"].values()) == proc["peak_rss_bytes"]


def test_a_run_stopped_inside_the_profiled_step_stops_the_profiler(fresh_sampler, tiny_model, tiny_dataset,
                                                                    tmp_path):
    """An exception in the profiled step (the divergence guard, Ctrl-C) never reaches ``on_step_end`` or
    ``on_train_end``: the trainer lets the profiler go as the exception passes, so no profiler keeps recording in a
    notebook that caught it (and none is left for the interpreter's teardown, where kineto segfaulted)."""
    from transformers import TrainerCallback

    from hf_memkit import MemkitTrainer
    from hf_memkit.memory import peak
    from hf_memkit.memory.profiler import MemoryReportCallback
    from tests.conftest import make_args

    class Boom(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step + 1 == 2:
                raise KeyboardInterrupt

    cb = MemoryReportCallback(profile_step=2, sample=False)
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=3), train_dataset=tiny_dataset,
                            callbacks=[cb, Boom()], recipe="lora")
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert cb._region is None and cb.peak_step is None
    assert len(peak._ACTIVE) == 0
    assert torch.autograd.profiler._is_profiler_enabled is False
