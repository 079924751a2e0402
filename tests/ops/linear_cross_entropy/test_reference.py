"""The torch path of linear_cross_entropy against F.cross_entropy on materialised logits."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_memkit.errors import MemkitError
from hf_memkit.ops.linear_cross_entropy import LinearCrossEntropyError, linear_cross_entropy
from hf_memkit.ops.linear_cross_entropy.reference import plan_chunks

from .cases import compare, make_problem

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
#: a budget of 16 KiB forces vocabulary chunks (online log-sum-exp + recomputation) at these sizes; None = one pass
BUDGETS = [None, 16 * 1024]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("softcap,reduction,bias,z_loss,shift",
                         list(itertools.product([None, 4.0], ["mean", "sum", "none"], [False, True], [0.0, 1e-2],
                                                [False, True])))
def test_matches_materialised_path(dtype, softcap, reduction, bias, z_loss, shift):
    # the spec's CPU check: N=257, D=63, V=1000, 20% ignored rows
    e, c, b, y = make_problem(7, dtype, 257, 63, 1000, batch=1 if shift else None, bias=bias, scale=2.0)
    for budget in BUDGETS:
        err = compare(e, c, b, y, softcap=softcap, reduction=reduction, z_loss=z_loss, shift=shift, impl="torch",
                      memory_budget=budget)
        assert err <= TOL[dtype], (budget, err)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), d=st.integers(1, 70), v=st.integers(2, 900), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]), softcap=st.sampled_from([None, 3.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]), bias=st.booleans(), budget=st.sampled_from(BUDGETS),
       batch=st.sampled_from([None, 1]))
def test_fresh_random_shapes(n, d, v, seed, dtype, softcap, reduction, bias, budget, batch):
    e, c, b, y = make_problem(seed, dtype, n, d, v, batch=batch, bias=bias)
    err = compare(e, c, b, y, softcap=softcap, reduction=reduction, shift=batch is not None, impl="torch",
                  memory_budget=budget)
    assert err <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_num_items_in_batch_is_sum_over_count(dtype):
    e, c, b, y = make_problem(3, dtype, 96, 17, 301, batch=2)
    for budget in BUDGETS:
        assert compare(e, c, b, y, shift=True, num_items_in_batch=torch.tensor(211), impl="torch",
                       memory_budget=budget) <= TOL[dtype]
        assert compare(e, c, b, y, shift=True, num_items_in_batch=57, impl="torch") <= TOL[dtype]


def test_shift_predicts_the_next_target_without_copying_e():
    e, c, _, y = make_problem(4, torch.float64, 40, 8, 50, batch=4)
    shifted = linear_cross_entropy(e, c, y, shift=True, reduction="none", impl="torch")
    manual = linear_cross_entropy(e[:, :-1], c, y[:, 1:], reduction="none", impl="torch")
    torch.testing.assert_close(shifted[:, :-1], manual)
    assert (shifted[:, -1] == 0).all()


def test_all_rows_ignored_gives_nan_mean_and_zero_grads_like_torch():
    e, c, _, y = make_problem(5, torch.float32, 10, 4, 12)
    y[:] = -100
    loss = linear_cross_entropy(e, c, y, impl="torch")
    ref = torch.nn.functional.cross_entropy((e @ c.T).float(), y)
    assert torch.isnan(loss) and torch.isnan(ref)
    assert linear_cross_entropy(e, c, y, reduction="sum", impl="torch").item() == 0.0
    for reduction in ("sum", "mean"):
        de, dc = torch.autograd.grad(linear_cross_entropy(e, c, y, reduction=reduction, impl="torch"), [e, c])
        assert not de.any() and not dc.any()


def test_frozen_classifier_gets_no_gradient_and_eval_needs_none():
    e, c, _, y = make_problem(6, torch.float32, 30, 8, 40)
    c.requires_grad_(False)
    loss = linear_cross_entropy(e, c, y, impl="torch")
    (de,) = torch.autograd.grad(loss, [e])
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(e @ c.T, y), [e])[0]
    torch.testing.assert_close(de, ref)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(e, c, y, impl="torch"),
                                   torch.nn.functional.cross_entropy(e @ c.T, y))


@pytest.mark.parametrize("reduction,budget,ignore", [("sum", None, 0.0), ("sum", 16 * 1024, 0.2),
                                                     ("none", None, 0.2), ("mean", 16 * 1024, 0.0)])
def test_filtering_error_is_bounded_by_eps_times_classifier_norms(reduction, budget, ignore):
    # peaked softmax (large logits) so that most entries fall below eps and whole columns are skipped
    e, c, _, y = make_problem(8, torch.float64, 64, 16, 500, ignore_frac=ignore, scale=3.0)
    eps = 1e-3

    def run(filter_eps):
        out = linear_cross_entropy(e, c, y, reduction=reduction, filter_eps=filter_eps, impl="torch",
                                   memory_budget=budget)
        return torch.autograd.grad(out.sum() * (64 if reduction == "mean" else 1), [e, c])

    (de, dc), (de0, dc0) = run(eps), run(None)
    assert not torch.equal(de, de0), "nothing was filtered; the test needs a peaked softmax"
    bound = eps * c.detach().norm(dim=1).sum()
    assert (de - de0).norm(dim=1).max() <= bound
    assert (dc - dc0).norm(dim=1).max() <= eps * e.detach().norm(dim=1).sum()


def test_bf16_error_no_worse_than_the_naive_bf16_path():
    e, c, b, y = make_problem(9, torch.bfloat16, 256, 64, 2000, bias=True)
    truth = [t.detach().double().requires_grad_() for t in (e, c, b)]
    from .cases import grads_of
    from hf_memkit.ops.linear_cross_entropy import naive_linear_cross_entropy

    exact = grads_of(naive_linear_cross_entropy, *truth, y, softcap=5.0)
    ours = grads_of(linear_cross_entropy, e, c, b, y, softcap=5.0, impl="torch")  # filter_eps auto = 2^-12
    naive = grads_of(naive_linear_cross_entropy, e, c, b, y, softcap=5.0)
    for o, n, x in zip(ours, naive, exact):
        err_ours = (o.double() - x).abs().max()
        err_naive = (n.double() - x).abs().max()
        assert err_ours <= err_naive + 1e-3 * x.abs().max(), (err_ours, err_naive)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mixed_dtypes_under_autocast_accumulate_in_fp32(reduction):
    # what a bf16 Trainer run on CPU hands over: bf16 hidden states, an fp32 lm_head weight, autocast on
    e, c, b, y = make_problem(17, torch.float32, 90, 24, 300, bias=True)
    e16 = e.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(e16, c, y, bias=b, reduction=reduction, memory_budget=16 * 1024, impl="torch")
    de, dc = torch.autograd.grad(out.sum(), [e16, c])
    assert out.dtype == torch.float32 and de.dtype == torch.bfloat16 and dc.dtype == torch.float32
    ref = linear_cross_entropy(e16.detach().float().requires_grad_(), c, y, bias=b, reduction=reduction,
                               impl="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_saved_tensor_has_n_times_v_elements(reduction):
    n, v = 512, 3000
    e, c, b, y = make_problem(10, torch.float32, n, 32, v, bias=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(e, c, y, bias=b, softcap=10.0, reduction=reduction, impl="torch",
                                    memory_budget=256 * 1024)
    assert sizes and max(sizes) < n * v
    loss.sum().backward()


def test_a_second_backward_through_a_retained_graph_fails_loudly():
    e, c, _, y = make_problem(11, torch.float32, 20, 8, 30)
    loss = linear_cross_entropy(e, c, y, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_upstream_gradient_scales_the_precomputed_gradients():
    e, c, _, y = make_problem(12, torch.float64, 50, 8, 70)
    de, dc = torch.autograd.grad(3.5 * linear_cross_entropy(e, c, y, impl="torch"), [e, c])
    de0, dc0 = torch.autograd.grad(3.5 * torch.nn.functional.cross_entropy(e @ c.T, y), [e, c])
    torch.testing.assert_close(de, de0)
    torch.testing.assert_close(dc, dc0)


def test_chunk_sizes_follow_the_budget():
    full = plan_chunks(4096, 49152, torch.float32, 64 * 2**20, 1)
    assert full.vocab == 49152 and full.rows == 64 * 2**20 // (49152 * 4)
    small = plan_chunks(4096, 49152, torch.float32, 1 * 2**20, 1)
    assert small.vocab < 49152 and small.rows * small.vocab * 4 <= 1 * 2**20
    assert plan_chunks(4096, 49152, torch.float32, 64 * 2**20, 2).rows == full.rows // 2


@pytest.mark.parametrize("kwargs,match", [
    ({"reduction": "avg"}, "reduction"),
    ({"reduction": "sum", "num_items_in_batch": 3}, "num_items_in_batch"),
    ({"softcap": -1.0}, "softcap"),
    ({"shift": -1}, "shift"),
    ({"z_loss": -0.1}, "z_loss"),
    ({"impl": "cuda"}, "impl"),
    ({"filter_eps": "high"}, "filter_eps"),
])
def test_bad_arguments_raise_typed_errors(kwargs, match):
    e, c, _, y = make_problem(13, torch.float32, 8, 4, 10)
    with pytest.raises(LinearCrossEntropyError, match=match) as info:
        linear_cross_entropy(e, c, y, **kwargs)
    assert isinstance(info.value, MemkitError) and isinstance(info.value, ValueError)


def test_bad_shapes_and_targets_raise_typed_errors():
    e, c, _, y = make_problem(14, torch.float32, 8, 4, 10)
    with pytest.raises(LinearCrossEntropyError, match="leading shape"):
        linear_cross_entropy(e, c, y[:5])
    with pytest.raises(LinearCrossEntropyError, match=r"\(V, D\)"):
        linear_cross_entropy(e, c[:, :3], y)
    with pytest.raises(LinearCrossEntropyError, match="outside"):
        linear_cross_entropy(e, c, torch.full_like(y, 10))
    with pytest.raises(LinearCrossEntropyError, match="integer"):
        linear_cross_entropy(e, c, y.float())


def test_impl_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    e, c, _, y = make_problem(15, torch.float32, 8, 4, 10)
    with pytest.raises(LinearCrossEntropyError, match="impl='triton' cannot run"):
        linear_cross_entropy(e, c, y, impl="triton")


def test_auto_resolves_to_torch_on_cpu_and_logs_once(caplog):
    from hf_memkit.ops.linear_cross_entropy import function

    function._logged.discard(("torch", "cpu"))
    e, c, _, y = make_problem(16, torch.float32, 8, 4, 10)
    with caplog.at_level("INFO", logger="hf_memkit"):
        linear_cross_entropy(e, c, y)
        linear_cross_entropy(e, c, y)
    lines = [r.message for r in caplog.records if "linear_cross_entropy runs" in r.message]
    assert lines == ["hf_memkit: linear_cross_entropy runs impl=torch on cpu (requested auto)"]


def test_importing_the_op_does_not_import_triton():
    code = ("import sys, hf_memkit, hf_memkit.ops.linear_cross_entropy, hf_memkit.losses.cce.technique; "
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
