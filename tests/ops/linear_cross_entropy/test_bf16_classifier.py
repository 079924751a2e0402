"""A 16-bit classifier with fp32 hidden states (16-bit weight storage, fp32 compute): the torch path equals the
fp32 computation with the rounded weight, returns dC in the weight's dtype, and never materialises an fp32 tensor
of the classifier's size (no fp32 copy of c, no (V, D) fp32 dC accumulator)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_memkit.ops.linear_cross_entropy import linear_cross_entropy, naive_linear_cross_entropy
from hf_memkit.ops.linear_cross_entropy.blocked import transient_bytes

from .cases import grads_of, make_problem, rel_err

#: None = the default budget (one tile for these sizes), 16 KiB = many row chunks and weight blocks
BUDGETS = [None, 16 * 1024, 64 * 1024]


def _bf16_problem(seed, n=257, d=63, v=1000, **kw):
    e, c, b, y = make_problem(seed, torch.float32, n, d, v, **kw)
    c16 = c.detach().bfloat16().requires_grad_()
    return e, c16, b, y


def _grads(fn, e, c, b, y, unit, **kw):
    """(loss, dE, dC, dbias) under a random upstream gradient, or 1 (``unit``, what Trainer.backward passes)."""
    if not unit:
        return grads_of(fn, e, c, b, y, **kw)
    out = fn(e, c, y, bias=b, **kw)
    inputs = [e, c] + ([b] if b is not None else [])
    return (out.detach(),) + tuple(g.detach() for g in torch.autograd.grad(out.sum(), inputs))


def _check(e, c16, b, y, unit=False, **kw):
    ours = _grads(linear_cross_entropy, e, c16, b, y, unit, impl="torch", **kw)
    c32 = c16.detach().float().requires_grad_()
    kw_naive = {k: v for k, v in kw.items() if k not in ("memory_budget", "filter_eps")}
    ref = _grads(naive_linear_cross_entropy, e, c32, b, y, unit, **kw_naive)
    loss, de, dc = ours[:3]
    assert dc.dtype == torch.bfloat16 and de.dtype == torch.float32 and loss.dtype == torch.float32
    assert rel_err(loss, ref[0]) <= 1e-5 and rel_err(de, ref[1]) <= 1e-5  # relative to the largest entry
    # dC: the fp32 sum rounded once to bf16 (half an ulp, 2^-9 relative, plus fp32 noise) for a scalar loss
    # under an upstream 1; an upstream other than 1 rescales the bf16 dC (one ulp in all); the recomputing
    # reduction="none" path rounds once
    once = unit or kw.get("reduction") == "none"
    err = (dc.double() - ref[2].double()).abs()
    bound = ref[2].double().abs() * (2**-8 if once else 2**-7) * (1 + 1e-3) + 1e-6 * ref[2].abs().max()
    assert bool((err <= bound).all()), float((err - bound).max())
    if b is not None:
        assert rel_err(ours[3], ref[3]) <= 1e-5


@pytest.mark.parametrize("softcap,reduction,bias,z_loss,shift",
                         list(itertools.product([None, 4.0], ["mean", "sum", "none"], [False, True], [0.0, 1e-2],
                                                [False, True]))[::2])
@pytest.mark.parametrize("budget", BUDGETS)
def test_matches_fp32_with_the_rounded_classifier(softcap, reduction, bias, z_loss, shift, budget):
    e, c16, b, y = _bf16_problem(7, batch=1 if shift else None, bias=bias, scale=2.0)
    _check(e, c16, b, y, softcap=softcap, reduction=reduction, z_loss=z_loss, shift=shift, memory_budget=budget)


@pytest.mark.parametrize("budget", BUDGETS)
def test_dc_is_rounded_once_under_a_unit_upstream_gradient(budget):
    e, c16, b, y = _bf16_problem(13, bias=True, scale=2.0)
    _check(e, c16, b, y, unit=True, softcap=3.0, memory_budget=budget)


def test_num_items_in_batch_and_all_rows_valid():
    e, c16, b, y = _bf16_problem(8, ignore_frac=0.0, bias=True)
    _check(e, c16, b, y, num_items_in_batch=300, memory_budget=16 * 1024)


def test_filtering_defaults_off_for_fp32_hidden_states():
    # filter_eps="auto" follows the hidden states: fp32 compute, no gradient filtering
    e, c16, b, y = _bf16_problem(9, v=3000)
    auto = grads_of(linear_cross_entropy, e, c16, b, y, impl="torch")
    off = grads_of(linear_cross_entropy, e, c16, b, y, impl="torch", filter_eps=None)
    for a, o in zip(auto, off):
        assert torch.equal(a, o)


def test_filtering_when_asked_stays_within_its_bound():
    e, c16, b, y = _bf16_problem(10, v=3000)
    eps = 2**-12
    _, de, dc = grads_of(linear_cross_entropy, e, c16, b, y, impl="torch", filter_eps=eps,
                         memory_budget=64 * 1024)
    _, de0, dc0 = grads_of(linear_cross_entropy, e, c16, b, y, impl="torch", filter_eps=None)
    assert (de - de0).norm(dim=1).max() <= eps * c16.detach().float().norm(dim=1).sum()


def test_frozen_classifier_and_evaluation():
    e, c16, _, y = _bf16_problem(11)
    c16.requires_grad_(False)
    loss = linear_cross_entropy(e, c16, y, impl="torch", memory_budget=16 * 1024)
    (de,) = torch.autograd.grad(loss, [e])
    ref = torch.nn.functional.cross_entropy(e.detach() @ c16.float().T, y, ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(e, c16, y, impl="torch"), ref, rtol=1e-5, atol=1e-6)


class _Allocations(TorchDispatchMode):
    """Every tensor an op returns: (dtype, numel)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.seen.append((t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("budget", [None, 64 * 1024])
def test_no_fp32_tensor_of_the_classifier_size_is_made(reduction, budget, monkeypatch):
    from hf_memkit.ops.linear_cross_entropy import blocked

    monkeypatch.setattr(blocked, "WEIGHT_BLOCK_BYTES", 64 * 1024)  # as a 16 MiB block is to SmolLM2's 113 MiB head
    n, d, v = 48, 128, 4096  # fewer tokens than hidden units: a (tokens x V) logit tile is smaller than V x D
    e, c16, b, y = _bf16_problem(12, n=n, d=d, v=v, bias=True)
    with _Allocations() as mode:
        loss = linear_cross_entropy(e, c16, y, bias=b, reduction=reduction, impl="torch", memory_budget=budget)
        loss.sum().backward()
    big = [s for s in mode.seen if s[0] == torch.float32 and s[1] >= v * d]
    assert not big, big
    assert c16.grad.dtype == torch.bfloat16 and c16.grad.shape == (v, d)


def test_transient_bytes_follow_the_budget():
    small = transient_bytes(4096, 49152, 576, torch.float32, 16 * 2**20, softcap=False)
    large = transient_bytes(4096, 49152, 576, torch.float32, 256 * 2**20, softcap=False)
    assert small < 49152 * 576 * 4  # below the fp32 copy of the classifier alone
    assert small < large


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("grad", [True, False])
def test_token_stats_equal_those_of_the_rounded_fp32_classifier(budget, grad):
    from hf_memkit.ops.linear_cross_entropy import TokenStats

    e, c16, b, y = _bf16_problem(14, bias=True, scale=3.0)
    top = (e.detach() @ c16.detach().float().t()).argmax(-1)
    y = torch.where((y >= 0) & (torch.arange(y.numel()) % 2 == 0), top, y)  # about half the targets are hits
    ours, ref = TokenStats(), TokenStats()
    with torch.set_grad_enabled(grad):
        linear_cross_entropy(e, c16, y, bias=b, impl="torch", memory_budget=budget, token_stats=ours)
        linear_cross_entropy(e, c16.detach().float(), y, bias=b, impl="torch", memory_budget=budget,
                             token_stats=ref)
    assert int(ours.count) == int(ref.count) and int(ours.correct) == int(ref.correct) > 0
    assert abs(float(ours.entropy_sum) - float(ref.entropy_sum)) <= 1e-5 * int(ref.count)
