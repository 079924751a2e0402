"""The plain PyTorch quantizer: error bound, unbiasedness, clamping."""

import torch

from hf_memkit.ops.stochastic_quant import dequantize_reference, quantize_reference
from hf_memkit.ops.stochastic_quant.reference import scale_of


def _ranges(x3):
    flat = x3.transpose(0, 1).reshape(x3.shape[1], -1)
    lo, hi = flat.amin(1), flat.amax(1)
    return hi - lo, lo


def test_error_is_at_most_one_step_per_element():
    torch.manual_seed(0)
    x = torch.randn(37, 4, 9) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1)
    alpha, beta = _ranges(x)
    s = scale_of(alpha)
    for _ in range(5):
        xh = dequantize_reference(quantize_reference(x, s, beta), s, beta, torch.float32)
        err = (xh - x).abs()
        assert (err <= (alpha / 255).view(1, -1, 1) * (1 + 1e-5)).all()


def test_mean_over_ten_thousand_draws_is_unbiased():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 50)
    alpha, beta = _ranges(x)
    s = scale_of(alpha)
    draws = x.expand(10_000, 2, 50).contiguous()
    mean = dequantize_reference(quantize_reference(draws, s, beta), s, beta, torch.float32).mean(0)
    assert (mean - x[0]).abs().max() < 1e-3
    # round-to-nearest would be biased by up to half a step; stochastic rounding is not
    nearest = torch.round((x - beta.view(1, -1, 1)) * s.view(1, -1, 1)) / s.view(1, -1, 1) + beta.view(1, -1, 1)
    assert (mean - x[0]).abs().mean() < (nearest - x).abs().mean() / 5


def test_values_outside_the_range_are_clamped_at_both_ends():
    x = torch.tensor([[[-5.0, 0.0, 0.5, 1.0, 7.0]]])
    s, beta = scale_of(torch.tensor([1.0])), torch.tensor([0.0])
    q = quantize_reference(x, s, beta)
    assert q.dtype == torch.uint8 and q[0, 0, 0] == 0 and q[0, 0, -1] == 255
    xh = dequantize_reference(q, s, beta, torch.float32)
    assert xh.min() >= 0 and xh.max() <= 1.0


def test_constant_group_quantizes_to_its_shift():
    x = torch.full((3, 1, 4), 2.5)
    s, beta = scale_of(torch.zeros(1)), torch.tensor([2.5])
    assert torch.equal(dequantize_reference(quantize_reference(x, s, beta), s, beta, torch.float32), x)
