"""Block-AP: the learnable quantizer's straight-through gradients, and block reconstruction beating RTN."""

from __future__ import annotations

import torch

from hf_memkit.quant.efficientqat.config import BlockAPConfig
from hf_memkit.quant.efficientqat.quantizer import FakeQuantLinear
from hf_memkit.compress.grid import QuantSpec, rtn_quantize


def _linear(out=8, cols=64, seed=0):
    lin = torch.nn.Linear(cols, out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, cols, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return lin


def test_starts_on_the_rtn_grid():
    lin = _linear()
    fq = FakeQuantLinear(lin, QuantSpec(4, 32))
    rtn = rtn_quantize(lin.weight.detach(), QuantSpec(4, 32), dtype=torch.float32).dequantize()
    torch.testing.assert_close(fq.fake_weight().detach(), rtn)


def test_straight_through_gradients():
    lin = _linear()
    fq = FakeQuantLinear(lin, QuantSpec(4, 32))
    with torch.no_grad():  # push some weights outside their group's range: the outer clamp cuts their gradient
        fq.scale.mul_(0.5)
    w_hat = fq.fake_weight()
    g = torch.randn_like(w_hat)
    (w_hat * g).sum().backward()
    s = fq.scale.detach().repeat_interleave(32, 1)
    z = fq.zero.detach().round().repeat_interleave(32, 1)
    level = torch.round(lin.weight.detach() / s) + z
    inside = (level >= 0) & (level <= 15)
    assert (~inside).any() and inside.any()
    torch.testing.assert_close(lin.weight.grad[inside], g[inside])  # d w_hat / d w = 1 inside the grid
    assert torch.equal(lin.weight.grad[~inside], torch.zeros_like(g[~inside]))  # 0 where clipped
    assert fq.scale.grad.abs().sum() > 0 and fq.zero.grad.abs().sum() > 0


def test_symmetric_grid_keeps_its_zero_point_fixed():
    fq = FakeQuantLinear(_linear(), QuantSpec(4, 32, symmetric=True))
    assert not fq.zero.requires_grad and bool((fq.zero == 8).all())


def test_block_reconstruction_beats_the_rtn_initialisation(tiny_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from hf_memkit.compress.calibration import from_corpus
    from hf_memkit.compress.linear import quantized_modules
    from hf_memkit.quant.pipeline import quantize_model_

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    calib = from_corpus(tiny_tokenizer, 8, 32)
    cfg = BlockAPConfig(bits=2, group_size=32, epochs=4, batch_size=4, lr_quant=1e-3, lr_weight=1e-4)
    report = quantize_model_(model, "block_ap", cfg, calibration=calib)
    assert len(report.blocks) == 2
    for block in report.blocks:
        assert block["mse_trained_fakequant"] < block["mse_rtn_init"], block
    layers = quantized_modules(model)
    assert len(layers) == 14 and all(qw.spec.bits == 2 for _n, _m, qw in layers)
    for _n, m, qw in layers:  # the written weight is exactly the dequantized codes
        assert torch.equal(m.weight, qw.dequantize())
