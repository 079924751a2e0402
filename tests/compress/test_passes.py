"""A compress pass is reached by name through the registry (hf_memkit.compress.passes): the same result as calling
the technique package's own pass, a third-party pruner runs by its class, and misuse names the problem."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.compress.passes import PassReport, check_pass, config_for, run_pass
from hf_memkit.errors import IncompatibleModelError


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_run_pass_by_name_equals_the_quant_pipeline(tiny_model, tiny_path):
    from transformers import AutoModelForCausalLM

    from hf_memkit.quant.pipeline import quantize_model_

    other = AutoModelForCausalLM.from_pretrained(tiny_path)
    cfg = config_for("rtn", bits=4, group_size=32)
    lorc = config_for("lorc", rank=4)
    report = run_pass("rtn", tiny_model, cfg, lorc=lorc)
    direct = quantize_model_(other, "rtn", cfg, lorc=lorc)
    assert isinstance(report, PassReport) and report.layers.keys() == direct.layers.keys()
    a, b = _weights(tiny_model), _weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(IncompatibleModelError, match="already quantized"):
        check_pass("rtn", tiny_model, cfg)


def test_run_pass_by_name_equals_the_prune_pipeline(tiny_model, tiny_path):
    from transformers import AutoModelForCausalLM

    from hf_memkit.prune.pipeline import prune_model_

    other = AutoModelForCausalLM.from_pretrained(tiny_path)
    run_pass("magnitude_24", tiny_model)
    prune_model_(other, "magnitude_24")
    a, b = _weights(tiny_model), _weights(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = tiny_model.model.layers[0].mlp.up_proj.weight
    assert int((w.reshape(-1, 4) != 0).sum(1).max()) <= 2


def test_a_third_party_pruner_runs_by_its_class(tiny_model):
    from typing import ClassVar

    from hf_memkit import registry
    from hf_memkit.prune.base import PruneTechnique
    from hf_memkit.prune.magnitude_24.config import Magnitude24Config

    seen = {}

    class Probe(PruneTechnique):
        name: ClassVar[str] = "probe_24"
        config_cls = Magnitude24Config
        summary: ClassVar[str] = "test"

        @classmethod
        def run_pass(cls, model, config, *, calibration=None, lorc=None, key=None):
            seen["key"] = key
            return {"pruner": cls.name}

    registry.register_technique(Probe, origin="test")
    try:
        assert run_pass("probe_24", tiny_model) == {"pruner": "probe_24"}
        assert seen["key"] == "compress.probe_24"
    finally:
        registry.unregister_technique("probe_24", "compress")


def test_misuse_names_the_problem(tiny_model):
    with pytest.raises(IncompatibleModelError, match="unknown compress technique 'gptqq'.*gptq"):
        run_pass("gptqq", tiny_model)
    with pytest.raises(IncompatibleModelError, match="not a pruning pass"):
        run_pass("magnitude_24", tiny_model, lorc=config_for("lorc"))
    with pytest.raises(IncompatibleModelError, match="compress.lorc has no pass of its own"):
        run_pass("lorc", tiny_model)
