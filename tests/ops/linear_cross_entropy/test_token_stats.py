"""TokenStats: the entropy / argmax accuracy / count that TRL logs, computed inside the chunked pass."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.ops.linear_cross_entropy import LinearCrossEntropyError, TokenStats, linear_cross_entropy

from .cases import make_problem

BUDGETS = [None, 16 * 1024]  # one pass / vocabulary chunks (online merge)


def _materialised(e, c, b, y, softcap, shift):
    logits = (e @ c.t()).double()
    if b is not None:
        logits = logits + b.double()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if shift:
        logits, y = logits[..., :-1, :], y[..., 1:]
    logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    keep = y != -100
    logits, y = logits[keep], y[keep]
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return float(entropy.sum()), int((logits.argmax(-1) == y).sum()), int(keep.sum())


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("softcap,bias,shift", [(None, False, False), (4.0, True, True), (None, True, True)])
@pytest.mark.parametrize("grad", [True, False])
def test_stats_match_the_materialised_logits(budget, softcap, bias, shift, grad):
    # scale 3 spreads the logits (a confident model, accuracy well above 0); under a softcap of 4 it would
    # saturate tanh into exact fp32 ties, where the argmax depends on rounding
    e, c, b, y = make_problem(11, torch.float32, 256, 33, 700, batch=2 if shift else None, bias=bias,
                              scale=1.0 if softcap else 3.0)
    top = (e.detach() @ c.detach().t()).argmax(-1).roll(1 if shift else 0, -1)  # the argmax of the row predicting y
    half = torch.arange(y.numel()).view(y.shape) % 2 == 0
    y = torch.where((y >= 0) & half, top, y)  # about half the targets are hits
    stats = TokenStats()
    with torch.set_grad_enabled(grad):
        loss = linear_cross_entropy(e, c, y, bias=b, softcap=softcap, shift=shift, impl="torch",
                                    memory_budget=budget, token_stats=stats)
    ent, hits, count = _materialised(e.detach(), c.detach(), None if b is None else b.detach(), y, softcap, shift)
    assert int(stats.count) == count
    assert int(stats.correct) == hits and 0.2 * count < hits < 0.8 * count
    assert abs(float(stats.entropy_sum) - ent) <= 1e-5 * count
    assert abs(stats.mean_entropy() - ent / count) < 1e-5 and abs(stats.accuracy() - hits / count) < 1e-12
    assert not stats.entropy_sum.requires_grad
    if grad:  # statistics change nothing in the loss or its gradients
        loss.backward()
        ge, gc = e.grad.clone(), c.grad.clone()
        e.grad = c.grad = None
        linear_cross_entropy(e, c, y, bias=b, softcap=softcap, shift=shift, impl="torch",
                             memory_budget=budget).backward()
        assert torch.equal(ge, e.grad) and torch.equal(gc, c.grad)


def test_argmax_ties_count_the_first_maximum_only():
    # vocab chunks of 16 columns: the tie spans a chunk boundary
    e = torch.ones(32, 1)
    c = torch.zeros(64, 1)
    c[5] = c[40] = 1.0  # columns 5 and 40 tie for the max
    y = torch.full((32,), 40)
    y[:10] = 5
    for budget in BUDGETS:
        stats = TokenStats()
        linear_cross_entropy(e, c, y, impl="torch", memory_budget=budget and 16 * 16 * 4, token_stats=stats)
        assert int(stats.correct) == 10, budget  # argmax picks 5, as torch.argmax does


def test_no_valid_targets_gives_zero_sums_and_calls_add_up():
    e, c, _, y = make_problem(2, torch.float32, 40, 8, 50)
    stats = TokenStats()
    linear_cross_entropy(e, c, torch.full_like(y, -100), impl="torch", token_stats=stats)
    assert int(stats.count) == 0 and float(stats.entropy_sum) == 0.0 and stats.mean_entropy() == 0.0
    linear_cross_entropy(e, c, y, impl="torch", token_stats=stats)
    linear_cross_entropy(e, c, y, impl="torch", token_stats=stats)
    assert int(stats.count) == 2 * int((y != -100).sum())


def test_wrong_type_is_refused():
    e, c, _, y = make_problem(2, torch.float32, 40, 8, 50)
    with pytest.raises(LinearCrossEntropyError, match="token_stats must be a TokenStats"):
        linear_cross_entropy(e, c, y, impl="torch", token_stats={})
