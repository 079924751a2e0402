"""Per-channel int8 quantization and Quantization-Aware Scaling on a toy per-channel-quantized layer."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.schedules.sparse_update.linear import sparse_channel_linear
from hf_memkit.schedules.sparse_update.quantize import dequantize, quantize_per_channel


def _toy(seed=0, spread=False, out=32, c_in=48):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, c_in, generator=g) * 0.05
    if spread:  # output channels whose scales span two orders of magnitude
        w = w * torch.logspace(-1, 1, out)[:, None]
    return w, torch.randn(64, c_in, generator=g), torch.randn(64, out, generator=g)


def _grads(seed=0, spread=False):
    """G̃ (int8 layer, QAS on), G_W̄ (QAS off), W̄, and the float layer's G_W and W, for the same MSE loss."""
    w, x, target = _toy(seed, spread)
    q, s = quantize_per_channel(w)
    idx = torch.arange(w.shape[1])  # every input channel: the whole weight trains in int8 units
    out = []
    for qas in (True, False):
        w_bar = torch.nn.Parameter(q.float())
        ((sparse_channel_linear(x, w, idx, w_bar, q, s, qas) - target) ** 2).mean().backward()
        out.append(w_bar.grad)
    w_float = torch.nn.Parameter(w.clone())
    ((x @ w_float.t() - target) ** 2).mean().backward()
    return out[0], out[1], q.float(), w_float.grad, w


def test_round_trip_error_is_below_half_a_step():
    w, _, _ = _toy(spread=True)
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((dequantize(q, s) - w).abs() <= s[:, None] / 2 + 1e-9).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qas_brings_the_gradient_to_weight_ratio_within_5_percent_of_float(seed):
    g_qas, g_raw, w_bar, g_w, w = _grads(seed)
    float_ratio = (g_w.norm() / w.norm()).item()
    assert abs((g_qas.norm() / w_bar.norm()).item() / float_ratio - 1) < 0.05
    assert (g_raw.norm() / w_bar.norm()).item() / float_ratio < 1e-4  # without QAS: ~s², hopelessly small


def test_qas_matches_float_per_output_channel_even_when_scales_differ():
    g_qas, g_raw, w_bar, g_w, w = _grads(spread=True)
    per_channel = (g_qas.norm(dim=1) / w_bar.norm(dim=1)) / (g_w.norm(dim=1) / w.norm(dim=1))
    assert (per_channel - 1).abs().max() < 0.05
    q, s = quantize_per_channel(w)
    torch.testing.assert_close(g_qas, g_raw / s[:, None] ** 2)  # G̃ = G_W̄ · s⁻², row by row
