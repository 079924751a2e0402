"""LoRC: the Eckart–Young residual, monotone in the rank, INT8 factors, and the side branch on a model."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.compress.grid import QuantSpec, rtn_quantize
from hf_memkit.quant.lorc.lorc import lorc_factors


def _pair(out=48, cols=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g, dtype=torch.float64) * 0.05
    w_hat = rtn_quantize(w, QuantSpec(3, 16)).dequantize()
    return w, w_hat


def test_residual_is_the_energy_of_the_dropped_singular_values():
    w, w_hat = _pair()
    e = w - w_hat
    previous = None
    for m in (0, 1, 4, 8, 16, 48):
        f = lorc_factors(w, w_hat, m)
        residual = torch.linalg.norm(e - f.A @ f.B) ** 2
        expected = torch.linalg.norm(e) ** 2 - (f.singular_values.double()[:m] ** 2).sum()
        assert abs(float(residual - expected)) <= 1e-9 * float(torch.linalg.norm(e) ** 2)
        if previous is not None:
            assert residual <= previous
        previous = residual
    assert float(previous) < 1e-20  # full rank reproduces E


def test_rank_is_capped_and_split_symmetrically():
    w, w_hat = _pair(8, 80)
    f = lorc_factors(w, w_hat, 32)
    assert f.rank == 8 and f.A.shape == (8, 8) and f.B.shape == (8, 80)
    f = lorc_factors(w, w_hat, 4)
    # A = U sqrt(S), B = sqrt(S) Vh: both factors carry the same column/row norms
    torch.testing.assert_close(f.A.norm(dim=0), f.B.norm(dim=1))


@pytest.mark.parametrize("bits,tol", [(8, 1e-3), (4, 5e-2)])
def test_rounded_factors_stay_close_to_the_exact_residual(bits, tol):
    w, w_hat = _pair()
    e = w - w_hat
    exact = lorc_factors(w, w_hat, 8)
    rounded = lorc_factors(w, w_hat, 8, factor_bits=bits)
    r_exact = torch.linalg.norm(e - exact.A @ exact.B) ** 2
    r_rounded = torch.linalg.norm(e - rounded.A @ rounded.B) ** 2
    assert float((r_rounded - r_exact) / r_exact) < tol
    # each row of each factor is the exact factor's row rounded to a per-row symmetric grid (see test_grid)
    grid = QuantSpec(bits, None, True)
    for got, want in ((rounded.A, exact.A), (rounded.B, exact.B)):
        on_grid = rtn_quantize(want.float(), grid, dtype=torch.float32).dequantize().double()
        assert torch.equal(got, on_grid)
        assert all(len(row.unique()) <= 2**bits for row in got)


def test_compensation_lowers_the_layer_output_error():
    w, w_hat = _pair()
    x = torch.randn(256, 80, dtype=torch.float64)
    f = lorc_factors(w, w_hat, 8)
    assert torch.linalg.norm(x @ (w - w_hat - f.A @ f.B).T) < torch.linalg.norm(x @ (w - w_hat).T)


def test_lorc_on_a_model_adds_a_branch_y_plus_a_bx(tiny_model):
    from hf_memkit.compress.linear import lorc_factors as branch_of
    from hf_memkit.quant.lorc.config import LorcCompensatorConfig
    from hf_memkit.quant.pipeline import quantize_model_

    lin = tiny_model.model.layers[0].mlp.down_proj
    w0 = lin.weight.detach().clone()
    report = quantize_model_(tiny_model, "rtn", lorc=LorcCompensatorConfig(rank=4))
    A, B, meta = branch_of(lin)
    assert A.shape == (64, 4) and B.shape == (4, 128) and meta == {"rank": 4, "factor_bits": None}
    x = torch.randn(3, 128)
    expected = x @ lin.weight.T + (x @ B.T) @ A.T
    torch.testing.assert_close(lin(x), expected)
    # the branch compensates: closer to the original layer than the bare quantized weight
    assert torch.linalg.norm(x @ w0.T - lin(x)) < torch.linalg.norm(x @ (w0 - lin.weight).T)
    assert 0 < report.layers["model.layers.0.mlp.down_proj"]["lorc_energy_kept"] <= 1
