"""Every covered op: output identical to the plain op, gradients with cosine > 0.999 against fp32 autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_memkit.activations.mesa.functions import (MesaActivation, MesaAttention, MesaGatedActivation, MesaLayerNorm,
                                                   MesaLinear, MesaRMSNorm)
from hf_memkit.activations.mesa.quantizer import PackCache, RangeTracker
from hf_memkit.memory.profiler import storage_bytes


def _tr(name="t", layout="channels"):
    return RangeTracker(name, layout, groups=4, ema_decay=0.9)


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _check(plain, mesa, inputs):
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    mesa_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    y_ref, y = plain(*ref_in), mesa(*mesa_in)
    assert torch.equal(y, y_ref), "the forward must be the plain op's, bit for bit"
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    for a, b in zip(ref_in, mesa_in):
        if a.requires_grad:
            assert _cos(a.grad, b.grad) > 0.999, a.shape


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_linear():
    x, w, b = torch.randn(4, 16, 32, requires_grad=True), torch.randn(24, 32, requires_grad=True), torch.randn(24, requires_grad=True)
    _check(F.linear, lambda x, w, b: MesaLinear.apply(x, w, b, _tr(), None), [x, w, b])


def test_rmsnorm():
    x, w = torch.randn(4, 16, 32, requires_grad=True) * 3, (1 + 0.1 * torch.randn(32)).requires_grad_()

    def plain(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    _check(plain, lambda x, w: MesaRMSNorm.apply(x, w, 1e-6, 0.0, _tr(), None), [x, w])


def test_layernorm():
    x = torch.randn(4, 16, 32, requires_grad=True)
    w, b = (1 + 0.1 * torch.randn(32)).requires_grad_(), torch.randn(32, requires_grad=True)
    plain = lambda x, w, b: F.layer_norm(x, (32,), w, b, 1e-5)  # noqa: E731
    ref_in = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    mesa_in = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y_ref, y = plain(*ref_in), MesaLayerNorm.apply(*mesa_in, 1e-5, _tr(), None)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    for a, c in zip(ref_in, mesa_in):
        assert _cos(a.grad, c.grad) > 0.999


@pytest.mark.parametrize("act", [torch.nn.SiLU(), torch.nn.GELU(), torch.nn.GELU(approximate="tanh")])
def test_activation(act):
    x = torch.randn(4, 16, 64, requires_grad=True) * 2
    _check(act, lambda x: MesaActivation.apply(x, act.forward, _tr(), None), [x])


def test_gated_activation():
    gate, up = torch.randn(4, 16, 64, requires_grad=True) * 2, torch.randn(4, 16, 64, requires_grad=True)
    _check(lambda a, b: F.silu(a) * b,
           lambda a, b: MesaGatedActivation.apply(a, b, F.silu, _tr("g"), _tr("u"), None), [gate, up])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_softmax_and_matmuls(kv_heads):
    from hf_memkit.integrations.attention import eager_attention

    b, h, L, d = 2, 4, 16, 8
    q = torch.randn(b, h, L, d, requires_grad=True)
    k, v = torch.randn(b, kv_heads, L, d, requires_grad=True), torch.randn(b, kv_heads, L, d, requires_grad=True)
    mask = torch.full((L, L), torch.finfo(torch.float32).min).triu(1).view(1, 1, L, L)
    module = torch.nn.Module()
    trackers = {r: _tr(r, "heads") for r in "qkvp"}
    _check(lambda q, k, v: eager_attention(module, q, k, v, mask, d ** -0.5)[0].transpose(1, 2),
           lambda q, k, v: MesaAttention.apply(q, k, v, mask, d ** -0.5, trackers, None), [q, k, v])


def test_saved_bytes_are_a_quarter_of_fp32_and_siblings_share_one_copy():
    x = torch.randn(8, 32, 64, requires_grad=True)
    ws = [torch.randn(64, 64, requires_grad=True) for _ in range(3)]
    saved = []
    cache = PackCache()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        for w in ws:
            MesaLinear.apply(x, w, None, _tr(), cache)
    assert storage_bytes(saved) <= x.numel() * 4 / 4 + 64  # one 8-bit copy + its (2, G) scale/shift


def test_running_range_follows_the_ema():
    tr = RangeTracker("t", "channels", 1, 0.9)
    tr.pack(torch.tensor([[0.0, 1.0]]))
    assert tr.alpha.item() == pytest.approx(1.0) and tr.beta.item() == pytest.approx(0.0)
    tr.pack(torch.tensor([[-1.0, 3.0]]))
    assert tr.alpha.item() == pytest.approx(1.0 - 0.1 * (1.0 - 4.0))
    assert tr.beta.item() == pytest.approx(0.0 - 0.1 * (0.0 + 1.0))
