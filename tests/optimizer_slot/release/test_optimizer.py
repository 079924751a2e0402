"""The GradientRelease wrapper on its own (no Trainer): each supporting optimizer gives the plain step's weights,
gradients are freed inside backward, clipping is per parameter, state is the inner optimizer's."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.optimizer_slot.release import GradientRelease
from tests.conftest import make_args
from tests.optim.cosmos.trainer_checks import one_cpu_thread  # noqa: F401  (autouse fixture)

#: every optimizer technique that supports gradient release, with settings that exercise its matrix path
SUPPORTED = {
    "adamw": {},
    "adamw_8bit": {},  # tiny's large tensors (>= 4096 elements) get 8-bit state
    "cosmos": {"rank": 8, "ns_dtype": "float32"},
    "fira": {"rank": 8, "update_proj_gap": 2},  # the projection is refreshed inside the 5 steps
}


def build_optimizer(name, model, tmp_path, **overrides):
    from hf_memkit import registry

    entry = registry.get(name, "optimizer")
    technique = entry.technique_cls(entry.config_cls(**{**SUPPORTED[name], **overrides}))
    return technique.create_optimizer(model, make_args(tmp_path, learning_rate=1e-2, weight_decay=0.1))


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (2, 16), generator=g) for _ in range(n)]


def backward(model, x):
    model(input_ids=x, labels=x).loss.backward()


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_release_equals_the_plain_step(name, tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    plain, released = (AutoModelForCausalLM.from_pretrained(tiny_path) for _ in range(2))
    opt = build_optimizer(name, plain, tmp_path)
    wrapper = GradientRelease(build_optimizer(name, released, tmp_path))
    for x in batches(5):
        opt.zero_grad()
        backward(plain, x)
        want_norm = torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()])
        opt.step()
        wrapper.zero_grad()
        backward(released, x)
        assert all(p.grad is None for p in released.parameters()), "every gradient is freed inside backward"
        assert wrapper.grad_norm().item() == pytest.approx(want_norm.item(), rel=1e-5)
        wrapper.step()
    assert max_diff(plain, released) <= 1e-6
    assert wrapper.memkit_peak_gradient_bytes > 0


def test_peak_gradient_bytes_is_one_tensor_not_all(tiny_model, tmp_path):
    sizes = [p.numel() * p.element_size() for p in tiny_model.parameters()]
    wrapper = GradientRelease(build_optimizer("adamw", tiny_model, tmp_path))
    for x in batches(2):
        backward(tiny_model, x)
        wrapper.step()
    assert wrapper.memkit_peak_gradient_bytes == max(sizes)  # the embedding's (or the head's) gradient
    assert wrapper.memkit_peak_gradient_bytes < sum(sizes) / 4  # a plain step holds sum(sizes) at once


def test_per_parameter_clipping_matches_clipping_each_tensor_alone(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    plain, released = (AutoModelForCausalLM.from_pretrained(tiny_path) for _ in range(2))
    limit = 0.05
    opt = build_optimizer("adamw", plain, tmp_path)
    wrapper = GradientRelease(build_optimizer("adamw", released, tmp_path), max_grad_norm=limit)
    clipped = 0
    for x in batches(3):
        opt.zero_grad()
        backward(plain, x)
        for p in plain.parameters():
            clipped += int(torch.nn.utils.clip_grad_norm_([p], limit) > limit)
        opt.step()
        backward(released, x)
        wrapper.step()
    assert clipped > 10, "the limit must bite for this test to mean anything"
    assert max_diff(plain, released) <= 1e-6


def test_step_steps_gradients_that_backward_did_not_form(tiny_path, tmp_path):
    """A gradient written by hand (no hook fires) is stepped by step(), as the plain optimizer would."""
    from transformers import AutoModelForCausalLM

    plain, released = (AutoModelForCausalLM.from_pretrained(tiny_path) for _ in range(2))
    opt = build_optimizer("adamw", plain, tmp_path)
    wrapper = GradientRelease(build_optimizer("adamw", released, tmp_path))
    for model in (plain, released):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
    want = torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()])
    assert wrapper.grad_norm().item() == pytest.approx(want.item(), rel=1e-6)
    opt.step()
    wrapper.step()
    assert wrapper.last_grad_norm.item() == pytest.approx(want.item(), rel=1e-6)
    assert all(p.grad is None for p in released.parameters())
    assert max_diff(plain, released) <= 1e-6


def test_accumulating_keeps_gradients_until_the_last_micro_batch(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    plain, released = (AutoModelForCausalLM.from_pretrained(tiny_path) for _ in range(2))
    opt = build_optimizer("adamw", plain, tmp_path)
    final = {"now": False}
    wrapper = GradientRelease(build_optimizer("adamw", released, tmp_path), accumulating=lambda: not final["now"])
    first, second = batches(2)
    backward(plain, first)
    backward(plain, second)
    opt.step()
    backward(released, first)
    assert all(p.grad is not None for p in released.parameters()), "a non-final micro-batch keeps its gradients"
    final["now"] = True
    backward(released, second)
    assert all(p.grad is None for p in released.parameters())
    wrapper.step()
    assert max_diff(plain, released) <= 1e-6
    assert wrapper.memkit_peak_gradient_bytes == sum(p.numel() * 4 for p in released.parameters())


def test_state_and_groups_are_the_inner_optimizers(tiny_model, tmp_path):
    inner = build_optimizer("adamw", tiny_model, tmp_path)
    wrapper = GradientRelease(inner)
    backward(tiny_model, batches(1)[0])
    wrapper.step()
    assert wrapper.param_groups is inner.param_groups and wrapper.state is inner.state
    saved = wrapper.state_dict()
    assert saved["state"].keys() == inner.state_dict()["state"].keys()
    plain = build_optimizer("adamw", tiny_model, tmp_path)
    plain.load_state_dict(saved)  # a release checkpoint resumes without release, and the other way round
    wrapper.load_state_dict(plain.state_dict())
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapper, lambda step: 0.5)  # a scheduler accepts the wrapper
    assert {g["lr"] for g in inner.param_groups} == {0.5e-2}
    assert scheduler.get_last_lr()[0] == 0.5e-2


def test_a_new_wrapper_takes_over_the_hooks(tiny_model, tmp_path):
    old = GradientRelease(build_optimizer("adamw", tiny_model, tmp_path))
    new = GradientRelease(build_optimizer("adamw", tiny_model, tmp_path))
    backward(tiny_model, batches(1)[0])
    assert not old.state and len(new.state) == len(list(tiny_model.parameters()))
    new.remove_hooks()
    backward(tiny_model, batches(1)[0])
    assert all(p.grad is not None for p in tiny_model.parameters()), "without hooks gradients stay"


def test_bitsandbytes_overrides_apply_to_their_own_parameter_only(tiny_model, tmp_path):
    """bitsandbytes keys overrides by (group, position) too; narrowed to one parameter, every parameter sits at
    position 0, so an override of the first parameter must not leak onto the others."""
    import bitsandbytes as bnb

    mng = bnb.optim.GlobalOptimManager.get_instance()
    first = next(tiny_model.parameters())
    try:
        mng.override_config(first, "optim_bits", 32)
        inner = build_optimizer("adamw_8bit", tiny_model, tmp_path)
        mng.register_parameters(inner.param_groups)  # fills the positional table as bitsandbytes' docs show
        wrapper = GradientRelease(inner)
        backward(tiny_model, batches(1)[0])
        wrapper.step()
    finally:
        mng.initialize()
    assert inner.state[first]["state1"].dtype == torch.float32
    large = [p for p in tiny_model.parameters() if p is not first and p.numel() >= 4096]
    assert large and all(inner.state[p]["state1"].dtype == torch.uint8 for p in large)
