"""The Triton kernels against F.cross_entropy on materialised logits. On CUDA they run compiled; without CUDA they
run in the Triton interpreter at small sizes. The interpreter must be chosen before triton is first imported
(triton's own library functions are defined at import), so on CPU this module runs in a child process started by
test_triton_interpreter.py with TRITON_INTERPRET=1, and skips itself in any other process."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA: these kernels run under the Triton interpreter in a child process "
                "(test_triton_interpreter.py)", allow_module_level=True)

try:
    import triton  # noqa: F401  (availability check)
except Exception as exc:  # ImportError, or a broken install
    pytest.skip(f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton", allow_module_level=True)

from hf_memkit.ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402

from .cases import compare, grads_of, make_problem  # noqa: E402


def _to(dev, *ts):
    return [None if t is None else t.detach().to(dev).requires_grad_(t.requires_grad) for t in ts]


@pytest.mark.parametrize("softcap,reduction,bias,z_loss,shift",
                         list(itertools.product([None, 3.0], ["mean", "sum", "none"], [False, True], [0.0, 1e-2],
                                                [False, True]))[::3])
def test_fp32_matches_materialised_path(softcap, reduction, bias, z_loss, shift):
    # odd sizes that leave partial row, vocabulary and hidden blocks
    e, c, b, y = make_problem(21, torch.float32, 70, 37, 150, batch=1 if shift else None, bias=bias, scale=2.0)
    e, c, b = _to(DEVICE, e, c, b)
    err = compare(e, c, b, y.to(DEVICE), softcap=softcap, reduction=reduction, z_loss=z_loss, shift=shift,
                  impl="triton")
    assert err <= 1e-5


def test_num_items_and_all_features_together():
    e, c, b, y = make_problem(22, torch.float32, 64, 20, 97, batch=2, bias=True)
    e, c, b = _to(DEVICE, e, c, b)
    assert compare(e, c, b, y.to(DEVICE), softcap=5.0, z_loss=1e-3, shift=True, num_items_in_batch=41,
                   impl="triton") <= 1e-5


def test_triton_agrees_with_the_torch_path_fresh_shapes():
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for _ in range(3):
        n, d, v = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 80), (1, 50), (2, 200)))
        e, c, b, y = make_problem(int(torch.randint(0, 2**31, (1,), generator=g)), torch.float32, n, d, v, bias=True)
        e, c, b = _to(DEVICE, e, c, b)
        tri = grads_of(linear_cross_entropy, e, c, b, y.to(DEVICE), softcap=4.0, impl="triton")
        ref = grads_of(linear_cross_entropy, e, c, b, y.to(DEVICE), softcap=4.0, impl="torch")
        for a, r in zip(tri, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=f"n={n} d={d} v={v}")


def test_bf16_with_filtering_and_vocab_sort_no_worse_than_naive():
    from hf_memkit.ops.linear_cross_entropy import naive_linear_cross_entropy

    e, c, b, y = make_problem(23, torch.bfloat16, 64, 32, 160, bias=True, scale=2.0)
    e, c, b = _to(DEVICE, e, c, b)
    y = y.to(DEVICE)
    exact = grads_of(naive_linear_cross_entropy, *[t.detach().double().requires_grad_() for t in (e, c, b)], y)
    ours = grads_of(linear_cross_entropy, e, c, b, y, impl="triton")  # filter_eps auto = 2^-12, vocab sorted
    naive = grads_of(naive_linear_cross_entropy, e, c, b, y)
    for o, n, x in zip(ours, naive, exact):
        assert (o.double() - x).abs().max() <= (n.double() - x).abs().max() + 2e-3 * x.abs().max()


def test_filtering_skips_tiles_within_the_bound():
    # a peaked softmax whose targets are the likely tokens, as in a trained model: sorting the vocabulary by
    # average logit gathers the targets into the first blocks, and the other tiles fall below eps and are skipped
    e, c, _, _ = make_problem(24, torch.float32, 32, 16, 1024, ignore_frac=0.0, scale=3.0)
    e, c = _to(DEVICE, e, c)
    y = (e @ c.T).argmax(1).detach()
    eps = 1e-3
    de, dc = torch.autograd.grad(linear_cross_entropy(e, c, y, reduction="sum", filter_eps=eps, impl="triton"),
                                 [e, c])
    de0, dc0 = torch.autograd.grad(linear_cross_entropy(e, c, y, reduction="sum", filter_eps=None, impl="triton"),
                                   [e, c])
    assert not torch.equal(dc, dc0), "no tile was skipped; the test needs a peaked softmax"
    assert (de - de0).norm(dim=1).max() <= eps * c.detach().norm(dim=1).sum()
    assert (dc - dc0).norm(dim=1).max() <= eps * e.detach().norm(dim=1).sum()


def test_no_saved_tensor_has_n_times_v_elements():
    n, v = 64, 200
    e, c, b, y = make_problem(25, torch.float32, n, 16, v, bias=True)
    e, c, b = _to(DEVICE, e, c, b)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    for reduction in ("mean", "none"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = linear_cross_entropy(e, c, y.to(DEVICE), bias=b, reduction=reduction, impl="triton")
        loss.sum().backward()
    assert sizes and max(sizes) < n * v


@pytest.mark.parametrize("grad", [True, False])
def test_token_stats_after_triton_equal_the_torch_path_and_leave_the_loss_alone(grad):
    from hf_memkit.ops.linear_cross_entropy import TokenStats

    e, c, b, y = make_problem(23, torch.float32, 64, 20, 97, batch=2, bias=True, scale=2.0)
    e, c, b = _to(DEVICE, e, c, b)
    y = y.to(DEVICE)
    got = {}
    for impl in ("triton", "torch"):
        stats = TokenStats()
        with torch.set_grad_enabled(grad):
            loss = linear_cross_entropy(e, c, y, bias=b, shift=True, impl=impl, token_stats=stats)
            plain = linear_cross_entropy(e, c, y, bias=b, shift=True, impl=impl)
        assert torch.equal(loss, plain)  # the kernels' numerics are unchanged by asking for statistics
        got[impl] = stats
    assert int(got["triton"].count) == int(got["torch"].count) > 0
    assert int(got["triton"].correct) == int(got["torch"].correct)
    assert abs(got["triton"].mean_entropy() - got["torch"].mean_entropy()) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_classifier_under_fp32_hidden_states_upcasts_tiles(reduction):
    # 16-bit weight storage with fp32 compute: the kernels read bf16 tiles of c and multiply in fp32
    e, c, b, y = make_problem(24, torch.float32, 48, 40, 130, bias=True, scale=2.0)
    e, b = _to(DEVICE, e, b)
    c16 = c.detach().to(DEVICE).bfloat16().requires_grad_()
    y = y.to(DEVICE)
    tri = grads_of(linear_cross_entropy, e, c16, b, y, softcap=4.0, reduction=reduction, impl="triton")
    ref = grads_of(linear_cross_entropy, e, c16.detach().float().requires_grad_(), b, y, softcap=4.0,
                   reduction=reduction, impl="torch")
    assert tri[2].dtype == torch.bfloat16 and tri[1].dtype == torch.float32
    for i, (a, r) in enumerate(zip(tri, ref)):
        if i == 2:  # dC rounded to bf16 (twice under an upstream gradient other than 1)
            assert bool(((a.float() - r).abs() <= r.abs() * 2**-7 + 1e-6 * r.abs().max()).all())
        else:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
