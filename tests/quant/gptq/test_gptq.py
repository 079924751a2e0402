"""GPTQ against RTN: bit-identical when the Hessian is a multiple of I, better on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from hf_memkit import load_recipe
from hf_memkit.errors import IncompatibleModelError, RecipeError
from hf_memkit.quant.gptq.gptq import HessianAccumulator, gptq_quantize
from hf_memkit.compress.grid import QuantSpec, rtn_quantize


def _w(out=32, cols=128, seed=0):
    return torch.randn(out, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


CASES = [
    (QuantSpec(4, 32, False), {}),
    (QuantSpec(3, None, False), {}),
    (QuantSpec(2, 64, True), {}),
    (QuantSpec(8, 16, False), {"block_size": 40}),
    (QuantSpec(4, 32, False), {"act_order": True, "static_groups": True}),
    (QuantSpec(4, None, True), {"act_order": True}),
    (QuantSpec(4, 32, False), {"mse": True}),
]


@pytest.mark.parametrize("spec,kw", CASES, ids=[f"{s.describe()}-{sorted(k)}".replace(" ", "-") for s, k in CASES])
def test_gptq_equals_rtn_bit_for_bit_when_h_is_a_multiple_of_identity(spec, kw):
    w = _w()
    res = gptq_quantize(w, 3.7 * torch.eye(w.shape[1]), spec, **kw)
    rtn = rtn_quantize(w, spec, mse=kw.get("mse", False))
    assert torch.equal(res.weight.codes, rtn.codes)
    assert torch.equal(res.weight.scale, rtn.scale) and torch.equal(res.weight.zero, rtn.zero)
    assert torch.equal(res.weight.dequantize(), rtn.dequantize())


def _correlated_inputs(n=4096, cols=256, rank=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return low + 0.1 * torch.randn(n, cols, generator=g)


@pytest.mark.parametrize("spec,kw", [(QuantSpec(4, 64, False), {}), (QuantSpec(3, None, False), {}),
                                     (QuantSpec(4, 64, False), {"act_order": True, "static_groups": True}),
                                     (QuantSpec(2, 32, True), {})])
def test_gptq_has_lower_layer_output_error_than_rtn_on_correlated_inputs(spec, kw):
    x = _correlated_inputs()
    w = _w(64, 256, seed=2)
    acc = HessianAccumulator(256)
    for chunk in x.split(1000):
        acc.add_batch(chunk)
    gptq = gptq_quantize(w, acc.H, spec, **kw).weight.dequantize()
    rtn = rtn_quantize(w, spec).dequantize()
    err_gptq = torch.linalg.norm(x @ (w - gptq).T)
    err_rtn = torch.linalg.norm(x @ (w - rtn).T)
    assert err_gptq < 0.9 * err_rtn, (float(err_gptq), float(err_rtn))


def test_hessian_accumulator_is_the_running_mean_of_2_x_xt():
    x = torch.randn(3, 50, 16, dtype=torch.float64)
    acc = HessianAccumulator(16)
    for batch in x:
        acc.add_batch(batch)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(acc.H, (2 / flat.shape[0] * flat.T @ flat).float(), rtol=1e-5, atol=1e-5)


def test_dead_inputs_are_zeroed_and_the_rest_stays_finite():
    x = _correlated_inputs(512, 64)
    x[:, 5] = 0
    acc = HessianAccumulator(64)
    acc.add_batch(x)
    q = gptq_quantize(_w(16, 64), acc.H, QuantSpec(4, 32, False)).weight.dequantize()
    assert torch.isfinite(q).all() and torch.equal(q[:, 5], torch.zeros(16))


def test_act_order_with_groups_needs_static_groups():
    with pytest.raises(IncompatibleModelError, match="static_groups"):
        gptq_quantize(_w(), torch.eye(128), QuantSpec(4, 32), act_order=True)
    with pytest.raises(RecipeError, match="static_groups: true"):
        load_recipe({"compress": [{"gptq": {"act_order": True, "group_size": 32}}]})
    load_recipe({"compress": [{"gptq": {"act_order": True, "static_groups": True}}]})


def test_gptq_quantize_stores_scales_in_the_requested_dtype():
    res = gptq_quantize(_w(), torch.eye(128), QuantSpec(4, 32), dtype=torch.bfloat16)
    assert res.weight.scale.dtype == torch.bfloat16 and res.weight.codes.dtype == torch.uint8
