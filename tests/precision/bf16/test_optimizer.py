"""WriteBack16: the inner optimizer steps an fp32 view, the write back rounds stochastically / with Kahan
compensation / to nearest; state, groups and checkpoints pass through."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.precision.bf16.optimizer import KAHAN, RoundingRNG, WriteBack16, find_write_back, kahan_buffers


def _swamp(update: str, n: int = 10_000, steps: int = 1000, delta: float = 1e-4):
    """The spec's swamping test: bf16 weights at 1.0, SGD steps of -delta (target 1 - steps * delta = 0.9)."""
    w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = WriteBack16(torch.optim.SGD([w], lr=1.0), update, RoundingRNG(0))
    grad = torch.full((n,), delta, dtype=torch.bfloat16)
    for _ in range(steps):
        w.grad = grad.clone()
        opt.step()
    return w, opt


def test_round_to_nearest_loses_every_small_update():
    w, _ = _swamp("nearest")
    assert bool((w == 1.0).all())


def test_stochastic_rounding_tracks_the_fp32_trajectory():
    w, _ = _swamp("stochastic")
    target = 1.0 - 1000 * float(torch.tensor(1e-4, dtype=torch.bfloat16))
    assert abs(float(w.detach().float().mean()) - target) < 3 * 0.02 / w.numel() ** 0.5
    assert w.dtype == torch.bfloat16


def test_kahan_weight_plus_compensation_tracks_the_fp32_trajectory():
    w, opt = _swamp("kahan")
    comp = opt.state[w][KAHAN]
    assert comp.dtype == torch.bfloat16 and comp.shape == w.shape
    target = 1.0 - 1000 * float(torch.tensor(1e-4, dtype=torch.bfloat16))
    assert float((w.detach().float() + comp.float() - target).abs().max()) < 1e-3
    assert float((w.detach().float() - target).abs().max()) < 2**-7  # the weight itself is within one ulp
    assert kahan_buffers(opt) == [comp]


@pytest.mark.parametrize("update", ["stochastic", "kahan"])
def test_weight_decay_survives_in_16_bits(update):
    # AdamW with zero gradients only decays: 1000 steps of (1 - 1e-4) each, every one below half an ulp (2^-8)
    w = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
    opt = WriteBack16(torch.optim.AdamW([w], lr=1e-2, weight_decay=1e-2), update, RoundingRNG(1))
    for _ in range(1000):
        w.grad = torch.zeros_like(w)
        opt.step()
    target = (1 - 1e-4) ** 1000
    value = w.detach().float() + (opt.state[w][KAHAN].float() if update == "kahan" else 0)
    assert abs(float(value.mean()) - target) < 1e-3
    rn = torch.nn.Parameter(torch.ones(10, dtype=torch.bfloat16))
    opt_rn = WriteBack16(torch.optim.AdamW([rn], lr=1e-2, weight_decay=1e-2), "nearest")
    for _ in range(100):
        rn.grad = torch.zeros_like(rn)
        opt_rn.step()
    assert bool((rn == 1.0).all())  # the failure the other modes avoid


def test_inner_state_is_fp32_and_keyed_by_the_parameter():
    w = torch.nn.Parameter(torch.randn(8, 8).bfloat16())
    b = torch.nn.Parameter(torch.randn(8))
    opt = WriteBack16(torch.optim.AdamW([w, b], lr=1e-2), "stochastic")
    w.grad, b.grad = torch.randn(8, 8).bfloat16(), torch.randn(8)
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.float32 and opt.state[w]["exp_avg_sq"].dtype == torch.float32
    assert w.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16  # the gradient is handed back as it was
    assert opt.state[b]["exp_avg"].dtype == torch.float32
    assert [len(g["params"]) for g in opt.param_groups] == [2]  # groups restored after the narrowing


def test_one_step_equals_the_fp32_optimizer_up_to_the_rounding():
    torch.manual_seed(0)
    w16 = torch.nn.Parameter(torch.randn(64, 32).bfloat16())
    w32 = torch.nn.Parameter(w16.detach().float().clone())
    g = torch.randn(64, 32)
    opt16 = WriteBack16(torch.optim.AdamW([w16], lr=1e-2, weight_decay=0.1), "nearest")
    opt32 = torch.optim.AdamW([w32], lr=1e-2, weight_decay=0.1)
    w16.grad, w32.grad = g.bfloat16(), g.bfloat16().float()
    opt16.step()
    opt32.step()
    assert torch.equal(w16, w32.detach().bfloat16())


def test_only_parameters_of_the_current_groups_with_a_gradient_are_stepped():
    # what gradient release does: narrow the groups to one parameter, call step(), restore
    a, b = (torch.nn.Parameter(torch.ones(300, dtype=torch.bfloat16)) for _ in range(2))
    c = torch.nn.Parameter(torch.ones(5))
    opt = WriteBack16(torch.optim.SGD([a, b, c], lr=0.5), "nearest")
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    group = opt.param_groups[0]
    kept = group["params"]
    group["params"] = [b]
    opt.step()
    group["params"] = kept
    assert bool((a == 1).all()) and bool((b == 0.5).all()) and bool((c == 1).all())
    opt.step()  # now everything with a gradient
    assert bool((a == 0.5).all()) and bool((b == 0).all()) and bool((c == 0.5).all())


def test_param_groups_assignment_reaches_the_inner_optimizer():
    a = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    inner = torch.optim.SGD([a], lr=0.1)
    opt = WriteBack16(inner, "nearest")
    groups = [dict(opt.param_groups[0], lr=0.25)]
    opt.param_groups = groups
    assert inner.param_groups is groups and opt.defaults is inner.defaults


def test_lr_scheduler_drives_the_inner_groups():
    a = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    inner = torch.optim.SGD([a], lr=1.0)
    opt = WriteBack16(inner, "nearest")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    a.grad = torch.ones_like(a)
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("update", ["stochastic", "kahan"])
def test_state_dict_round_trip_keeps_fp32_moments_and_kahan(update):
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(16, 16).bfloat16())
    opt = WriteBack16(torch.optim.AdamW([w], lr=1e-2), update, RoundingRNG(3))
    for _ in range(3):
        w.grad = torch.randn(16, 16).bfloat16()
        opt.step()
    saved = opt.state_dict()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = WriteBack16(torch.optim.AdamW([w2], lr=1e-2), update, RoundingRNG(3))
    opt2.load_state_dict(saved)  # torch casts floating state to the (bf16) parameter dtype; the wrapper undoes it
    for k, v in opt.state[w].items():
        if isinstance(v, torch.Tensor):
            assert opt2.state[w2][k].dtype == v.dtype and torch.equal(opt2.state[w2][k], v), k
    if update == "kahan":
        assert opt2.state[w2][KAHAN].dtype == torch.bfloat16


def test_bitsandbytes_8bit_inner_optimizer_keeps_8bit_state():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(64, 128).bfloat16())
    opt = WriteBack16(bnb.optim.AdamW8bit([w], lr=1e-3, min_8bit_size=4096), "stochastic", RoundingRNG(0))
    before = w.detach().clone()
    w.grad = torch.randn(64, 128).bfloat16()
    opt.step()
    assert opt.state[w]["state1"].dtype == torch.uint8 and w.dtype == torch.bfloat16
    assert not torch.equal(before, w)
    saved = opt.state_dict()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = WriteBack16(bnb.optim.AdamW8bit([w2], lr=1e-3, min_8bit_size=4096), "stochastic")
    opt2.load_state_dict(saved)
    assert opt2.state[w2]["absmax1"].dtype == torch.float32


def test_found_through_wrappers():
    a = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = WriteBack16(torch.optim.SGD([a], lr=0.1), "nearest")

    class Outer:
        optimizer = opt

    assert find_write_back(Outer()) is opt and find_write_back(torch.optim.SGD([a], lr=0.1)) is None


def test_bad_update_is_refused():
    with pytest.raises(ValueError, match="update"):
        WriteBack16(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), "up")


def test_bitsandbytes_module_overrides_apply_to_their_parameter_only():
    # transformers registers a 32-bit override for embeddings; the narrowed steps must not hand it to the
    # parameter that sits at the embedding's position in another narrowing
    bnb = pytest.importorskip("bitsandbytes")
    mng = bnb.optim.GlobalOptimManager.get_instance()
    saved = (list(mng.module_weight_config_triple), dict(mng.pid2config), dict(mng.index2config))
    try:
        emb = torch.nn.Embedding(64, 128)
        lin = torch.nn.Linear(128, 64, bias=False)
        for m in (emb, lin):
            m.weight.data = m.weight.data.bfloat16()
        mng.register_module_override(emb, "weight", {"optim_bits": 32})
        inner = bnb.optim.AdamW8bit([emb.weight, lin.weight], lr=1e-3, min_8bit_size=4096)
        opt = WriteBack16(inner, "nearest")
        for m in (emb, lin):
            m.weight.grad = torch.randn_like(m.weight)
        opt.step()
        assert inner.initialized and opt.state[emb.weight]["state1"].dtype == torch.float32
        assert opt.state[lin.weight]["state1"].dtype == torch.uint8
        opt.initialized = False  # an attribute of the inner optimizer is set there
        assert inner.initialized is False and "initialized" not in vars(opt)
    finally:
        mng.module_weight_config_triple[:] = saved[0]
        mng.pid2config.clear()
        mng.pid2config.update(saved[1])
        mng.index2config.clear()
        mng.index2config.update(saved[2])


def test_a_scheduler_wrapping_step_wraps_the_wrapper_not_the_inner_optimizer():
    a = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    inner = torch.optim.SGD([a], lr=1.0)
    torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1.0)  # the inner optimizer got an instance step already
    opt = WriteBack16(inner, "nearest")
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert "step" in vars(opt)
    a.grad = torch.ones_like(a)
    opt.step()  # no recursion through the inner optimizer's step
    assert bool((a == 0).all())
