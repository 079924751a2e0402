"""WTA-CRS: unbiased weight gradient, lower error than plain column-row sampling, exact forward and input gradient,
k/N saved bytes, recipe errors, and the estimate on the tiny Llama."""

from __future__ import annotations

import pytest
import torch

from hf_memkit import load_recipe
from hf_memkit.activations.wta_crs.function import WtaCrsLinear
from hf_memkit.activations.wta_crs.sampler import choose_rows, row_probabilities
from hf_memkit.activations.wta_crs.technique import WtaCrsTechnique
from hf_memkit.errors import IncompatibleModelError, RecipeError
from hf_memkit.memory.estimate import estimate_memory
from hf_memkit.memory.profiler import SavedTensorMeter, storage_bytes


def _heavy_tailed(n=200, d_in=16, d_out=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = (1.0 / torch.rand(n, 1, generator=g).clamp_min(1e-3)) ** 0.8  # heavy-tailed: a few rows dominate
    x = torch.randn(n, d_in, generator=g) * scale
    gy = torch.randn(n, d_out, generator=g)
    return x, gy


def _estimates(x, gy, k, winners, draws):
    p = row_probabilities(x)
    out = torch.empty(draws, gy.shape[1], x.shape[1], dtype=torch.float64)
    for i in range(draws):
        idx, w = choose_rows(p, k, winners)
        out[i] = (gy[idx].double().t() @ (x[idx].double() * w[:, None].double()))
    return out


def test_monte_carlo_mean_equals_the_exact_gradient_within_one_percent():
    torch.manual_seed(0)
    x, gy = _heavy_tailed()
    exact = gy.double().t() @ x.double()
    est = _estimates(x, gy, k=60, winners=True, draws=10_000)
    rel = (est.mean(0) - exact).norm() / exact.norm()
    assert rel < 0.01, rel


def test_error_is_below_plain_column_row_sampling_at_the_same_k():
    torch.manual_seed(1)
    x, gy = _heavy_tailed(seed=1)
    exact = gy.double().t() @ x.double()
    mse = {w: ((_estimates(x, gy, 40, w, 2000) - exact) ** 2).sum((1, 2)).mean().item() for w in (True, False)}
    assert mse[True] < mse[False], mse


def test_forward_and_input_gradient_are_exact_and_saved_bytes_are_k_over_n():
    torch.manual_seed(2)
    lin = torch.nn.Linear(32, 24)
    x = torch.randn(8, 25, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = WtaCrsLinear.apply(x, lin.weight, lin.bias, 0.3, 10, True)
    y_ref = lin(x2)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    wgrad, bgrad = lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.zero_grad()
    y_ref.backward(g)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(bgrad, lin.bias.grad)
    assert torch.nn.functional.cosine_similarity(wgrad.flatten(), lin.weight.grad.flatten(), dim=0) > 0.5
    n, k = 200, 60
    rows = storage_bytes([t for t in saved if t.dtype == torch.float32])
    assert rows == k * 32 * 4  # k of the N rows of x
    assert storage_bytes(saved) == pytest.approx(k / n * x.numel() * 4, rel=0.1)  # plus k int64 indices


def test_tiny_llama_estimate_and_bad_input(tiny_model):
    tiny_model.train()
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    handle = WtaCrsTechnique().patch_model(tiny_model)
    meter = SavedTensorMeter(tiny_model, 512)
    with meter.measure():
        loss = tiny_model(input_ids=ids, labels=ids).loss
    loss.backward()
    est = estimate_memory(tiny_model.config, load_recipe({"activations": [{"wta_crs": {}}]}), batch_size=4, seq_len=32)
    assert est.categories()["activations"] == pytest.approx(meter.bytes["activations"], rel=0.02)
    handle.remove()
    assert not any("forward" in vars(m) for m in tiny_model.modules())
    with pytest.raises(IncompatibleModelError, match="wta_crs.targets"):
        WtaCrsTechnique(WtaCrsTechnique.config_cls(targets=["c_fc"])).patch_model(tiny_model)
    for bad in ({"ratio": 0}, {"ratio": 1.5}, {"targets": []}, {"min_k": 0}):
        with pytest.raises(RecipeError):
            load_recipe({"activations": [{"wta_crs": bad}]})
