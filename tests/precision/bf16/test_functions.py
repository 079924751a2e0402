"""Linear16 / Embedding16: fp32 compute over 16-bit weights equals a plain fp32 computation with the rounded
weights, and nothing fp32 of a weight's size is kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_memkit.precision.bf16 import functions
from hf_memkit.precision.bf16.functions import embedding16, linear16


def _problem(seed, n=(3, 7), fin=24, fout=40, dtype=torch.bfloat16, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*n, fin, generator=g).requires_grad_()
    w = torch.randn(fout, fin, generator=g).to(dtype).requires_grad_()
    b = torch.randn(fout, generator=g).requires_grad_() if bias else None
    return x, w, b


def _reference(x, w, b, up):
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().float().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if b is not None else None
    y = F.linear(x2, w2, b2)
    y.backward(up)
    return y.detach(), x2.grad, w2.grad, (b2.grad if b2 is not None else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("blocked", [False, True])
def test_linear_matches_fp32_reference_with_the_rounded_weight(dtype, bias, blocked, monkeypatch):
    if blocked:  # weights larger than the upcast block go through the row-block path
        monkeypatch.setattr(functions, "UPCAST_BLOCK_BYTES", 24 * 4 * 7)
    x, w, b = _problem(0, dtype=dtype, bias=bias)
    y = linear16(x, w, b)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(up)
    ref_y, ref_dx, ref_dw, ref_db = _reference(x, w, b, up)
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32 and w.grad.dtype == dtype
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_dw.to(dtype), rtol=0, atol=0)  # fp32 gradient rounded once
    if bias:
        torch.testing.assert_close(b.grad, ref_db, rtol=1e-5, atol=1e-5)


def test_fp64_inputs_pass_gradcheck_through_the_function():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5).bfloat16()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: functions.Linear16.apply(x, w, b), (x, b))


def _saved(fn):
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("frozen", [False, True])
def test_nothing_fp32_of_the_weight_size_is_saved(frozen, monkeypatch):
    monkeypatch.setattr(functions, "UPCAST_BLOCK_BYTES", 64 * 4 * 16)
    x, w, b = _problem(2, n=(5,), fin=64, fout=256)
    w.requires_grad_(not frozen)
    out, saved = _saved(lambda: linear16(x, w, b))
    assert saved, "the Function saves what backward needs"
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= w.numel()]
    assert (torch.bfloat16, w.numel(), w.data_ptr()) in saved  # the 16-bit parameter itself
    if frozen:
        assert not [s for s in saved if s[1] == x.numel() and s[0] == torch.float32]  # x only when W trains
    out.sum().backward()


def test_no_grad_and_eval_take_the_plain_path():
    x, w, b = _problem(3)
    with torch.no_grad():
        y = linear16(x, w, b)
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.linear(x, w.float(), b), rtol=1e-6, atol=1e-6)


def test_embedding_sums_repeated_tokens_in_fp32_and_respects_padding():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(50, 8, generator=g).bfloat16().requires_grad_()
    ids = torch.tensor([[1, 3, 3, 3, 0, 7], [7, 7, 0, 1, 49, 3]])
    out = embedding16(ids, w, padding_idx=0)
    assert out.dtype == torch.float32
    up = torch.randn(out.shape, generator=g)
    out.backward(up)
    w32 = w.detach().float().requires_grad_()
    ref = F.embedding(ids, w32, padding_idx=0)
    ref.backward(up)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=0)
    assert w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad, w32.grad.bfloat16(), rtol=0, atol=0)
    assert bool((w.grad[0] == 0).all())


def test_embedding_saves_only_the_indices():
    w = torch.randn(1000, 16).bfloat16().requires_grad_()
    ids = torch.randint(0, 1000, (4, 9))
    out, saved = _saved(lambda: embedding16(ids, w, None))
    assert [s for s in saved if s[0].is_floating_point] == []
    out.sum().backward()
