"""The rtn technique: finalize quantizes every Linear but the head with its config's grid, and reports it."""

from __future__ import annotations

import json

import torch

from hf_memkit.compress.grid import QuantSpec, rtn_quantize
from hf_memkit.compress.linear import quantized_modules
from hf_memkit.quant.rtn.config import RTNConfig
from hf_memkit.quant.rtn.technique import RTNTechnique


def test_finalize_rounds_every_linear_but_the_head(tiny_model, tmp_path):
    originals = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules()
                 if isinstance(m, torch.nn.Linear)}
    technique = RTNTechnique(RTNConfig(bits=3, group_size=32, symmetric=True))
    assert technique.patch_model(tiny_model) is None  # nothing happens before training
    technique.finalize(tiny_model, str(tmp_path))
    layers = {n: qw for n, _m, qw in quantized_modules(tiny_model)}
    assert set(layers) == set(originals) - {"lm_head"}
    for name, qw in layers.items():
        expected = rtn_quantize(originals[name], QuantSpec(3, 32, True))
        assert torch.equal(qw.codes, expected.codes) and torch.equal(qw.scale, expected.scale)
    assert torch.equal(tiny_model.lm_head.weight, originals["lm_head"])
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert report["techniques"] == ["rtn"] and report["pass"]["spec"] == {"bits": 3, "group_size": 32,
                                                                           "symmetric": True}


def test_skip_modules_by_suffix(tiny_model, tmp_path):
    RTNTechnique(RTNConfig(skip_modules=["lm_head", "mlp.down_proj"])).finalize(tiny_model, str(tmp_path))
    names = {n for n, _m, _q in quantized_modules(tiny_model)}
    assert len(names) == 12 and not any(n.endswith("down_proj") for n in names)
