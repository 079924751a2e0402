"""The uniform grid: every dequantized value lies on its group's grid, RTN error bounds, spec checks."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.errors import IncompatibleModelError
from hf_memkit.compress.grid import QuantSpec, dequantize, fit_params, rtn_quantize

SPECS = [QuantSpec(b, g, s) for b in (2, 3, 4, 8) for g in (None, 32) for s in (False, True)]


def _weights(out=48, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier, so some groups have a wide range
    return w


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "-"))
def test_every_dequantized_value_lies_on_its_groups_grid(spec):
    w = _weights()
    qw = rtn_quantize(w, spec)
    out, cols = w.shape
    width = spec.group_width(cols)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= spec.maxq
    assert qw.scale.shape == qw.zero.shape == (out, cols // width)
    w_hat = qw.dequantize()
    s = qw.scale.repeat_interleave(width, 1)
    z = qw.zero.float().repeat_interleave(width, 1)
    k = w_hat / s + z  # the integer level of each value on its own group's grid
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert k.round().min() >= 0 and k.round().max() <= spec.maxq
    if spec.symmetric:
        assert bool((qw.zero == 2 ** (spec.bits - 1)).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_rtn_error_is_at_most_half_a_step(bits):
    w = _weights()
    qw = rtn_quantize(w, QuantSpec(bits, 32, False))
    step = qw.scale.repeat_interleave(32, 1)
    assert bool(((qw.dequantize() - w).abs() <= step / 2 + 1e-7).all())


def test_dequantize_matches_the_compressed_tensors_formula_bitwise():
    w = _weights()
    qw = rtn_quantize(w, QuantSpec(4, 32, False))
    naive = (qw.codes.float() - qw.zero.float().repeat_interleave(32, 1)) * qw.scale.repeat_interleave(32, 1)
    assert torch.equal(dequantize(qw.codes, qw.scale, qw.zero), naive)


def test_mse_search_never_loses_to_min_max():
    w = _weights()
    spec = QuantSpec(3, None, False)
    plain = (rtn_quantize(w, spec).dequantize() - w).abs().pow(2.4).sum(1)
    searched = (rtn_quantize(w, spec, mse=True).dequantize() - w).abs().pow(2.4).sum(1)
    assert bool((searched <= plain + 1e-9).all()) and searched.sum() < plain.sum()


def test_all_zero_group_gets_a_valid_grid():
    w = torch.zeros(4, 64)
    for sym in (False, True):
        qw = rtn_quantize(w, QuantSpec(4, 32, sym))
        assert torch.equal(qw.dequantize(), w) and bool((qw.scale > 0).all())


def test_scales_are_stored_in_the_weight_dtype_and_codes_use_the_stored_scale():
    w = _weights().to(torch.bfloat16)
    qw = rtn_quantize(w, QuantSpec(8, 32, False))
    assert qw.scale.dtype == torch.bfloat16
    s = qw.scale.float().repeat_interleave(32, 1)
    z = qw.zero.float().repeat_interleave(32, 1)
    assert torch.equal(qw.codes.float(), torch.clamp(torch.round(w.float() / s) + z, 0, 255))


def test_unsupported_bit_width_and_group_size():
    with pytest.raises(ValueError, match="5-bit"):
        QuantSpec(5, 128)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, 0)


def test_group_size_must_divide_the_width_but_narrow_layers_go_per_channel():
    spec = QuantSpec(4, 128)
    with pytest.raises(IncompatibleModelError, match="does not divide the input width 576.*group_size: 64"):
        spec.check_width(576, "model.layers.0.self_attn.q_proj", "compress.rtn")
    spec.check_width(1536, "down_proj", "compress.rtn")
    spec.check_width(64, "narrow", "compress.rtn")  # narrower than one group: one group per row
    assert spec.for_width(64) == QuantSpec(4, None) and spec.for_width(256) is spec
    assert rtn_quantize(torch.randn(8, 64), spec).scale.shape == (8, 1)


def test_fit_params_widens_the_range_to_include_zero():
    w = torch.full((2, 8), 0.5)
    scale, zero = fit_params(w, QuantSpec(4, None, False))
    assert torch.allclose(scale, torch.full((2,), 0.5 / 15)) and torch.equal(zero, torch.zeros(2))
