"""COMP / L1 structured pruning, 2:4 export and fresh-process loads with plain transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch

from hf_memkit.errors import IncompatibleModelError
from hf_memkit.prune.masks import nm_counts
from hf_memkit.prune.pipeline import prune_model_
from hf_memkit.compress.calibration import from_corpus

LOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.arange(40).reshape(2, 20) % m.config.vocab_size
with torch.no_grad():
    torch.save(m(ids).logits, sys.argv[2])
assert "hf_memkit" not in sys.modules
print(m.config.num_hidden_layers, m.config.intermediate_size)
"""


def _fresh_logits(folder, tmp_path):
    out = tmp_path / "logits.pt"
    r = subprocess.run([sys.executable, "-c", LOAD, str(folder), str(out)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(out), r.stdout.split()[-2:]


def _ours(model):
    ids = torch.arange(40).reshape(2, 20) % model.config.vocab_size
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("name", ["comp", "l1_structured"])
def test_structured_gives_standard_smaller_config(name, tiny_model, tiny_tokenizer, tmp_path):
    from hf_memkit import registry
    from hf_memkit.export.checkpoint import export_model
    from hf_memkit.recipe import ExportConfig

    cfg = registry.get(name).config_cls(ratio=0.6, layer_share=0.5, round_to=8) if name == "comp" else \
        registry.get(name).config_cls(ratio=0.3, round_to=8)
    calib = from_corpus(tiny_tokenizer, 4, 32)
    report = prune_model_(tiny_model, name, cfg, calibration=calib if name == "comp" else None)
    c = tiny_model.config
    if name == "comp":
        assert report["layers_dropped"] and c.num_hidden_layers == 1
    assert c.intermediate_size < 128 and c.intermediate_size % 8 == 0
    for layer in tiny_model.model.layers:
        assert layer.mlp.up_proj.out_features == c.intermediate_size == layer.mlp.down_proj.in_features
    export_model(tiny_model, str(tmp_path / "out"), ExportConfig(format="compressed-tensors"), model_card=False)
    saved = json.load(open(tmp_path / "out" / "config.json"))
    assert "quantization_config" not in saved and saved["intermediate_size"] == c.intermediate_size
    logits, (layers, inter) = _fresh_logits(tmp_path / "out", tmp_path)
    assert int(layers) == c.num_hidden_layers and int(inter) == c.intermediate_size
    torch.testing.assert_close(logits, _ours(tiny_model), atol=1e-5, rtol=0)


def test_comp_mask_tuning_reduces_reconstruction_error(tiny_model, tiny_tokenizer):
    import copy

    from hf_memkit.prune.comp.config import COMPConfig

    calib = from_corpus(tiny_tokenizer, 4, 32)
    ids = calib.batches[0]["input_ids"]
    with torch.no_grad():
        ref = tiny_model(ids).logits
    tuned, raw = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    prune_model_(tuned, "comp", COMPConfig(ratio=0.3, layer_share=0.0, damp=1e-4), calibration=calib)
    prune_model_(raw, "comp", COMPConfig(ratio=0.3, layer_share=0.0, damp=1e9), calibration=calib)  # c -> ~0
    with torch.no_grad():
        e_tuned = (tuned(ids).logits - ref).square().mean()
    assert e_tuned < (raw(ids).logits - ref).square().mean()


def test_bad_inputs_are_typed_errors(tiny_model):
    from hf_memkit import load_recipe
    from hf_memkit.errors import RecipeError
    from hf_memkit.prune.comp.config import COMPConfig

    with pytest.raises(RecipeError):
        load_recipe({"compress": [{"comp": {"ratio": 1.5}}]})
    with pytest.raises(RecipeError):
        load_recipe({"compress": [{"magnitude_24": {"n": 1, "m": 8}}]}).build()[0].validate(
            __import__("hf_memkit.technique", fromlist=["x"]).ValidationContext(None))
    with pytest.raises(IncompatibleModelError):
        prune_model_(torch.nn.Sequential(torch.nn.Linear(8, 8)), "l1_structured")
    with pytest.raises(IncompatibleModelError):
        prune_model_(tiny_model, "comp", COMPConfig(), calibration=None)


@pytest.mark.parametrize("quantized", [False, True])
def test_24_export_loads_in_fresh_process(quantized, tiny_model, tmp_path):
    from hf_memkit.export.checkpoint import export_model
    from hf_memkit.quant.pipeline import quantize_model_
    from hf_memkit.quant.rtn.config import RTNConfig
    from hf_memkit.recipe import ExportConfig

    prune_model_(tiny_model, "magnitude_24")
    if quantized:
        quantize_model_(tiny_model, "rtn", RTNConfig(bits=4, group_size=32, symmetric=True))
    for n, m in tiny_model.named_modules():
        if type(m) is torch.nn.Linear and n != "lm_head":
            assert (nm_counts(m.memkit_sparsity_mask) == 2).all() and (nm_counts(m.weight) <= 2).all()
    out = tmp_path / "ct"
    export_model(tiny_model, str(out), ExportConfig(format="compressed-tensors"), model_card=False)
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"
    logits, _ = _fresh_logits(out, tmp_path)
    torch.testing.assert_close(logits, _ours(tiny_model), atol=1e-5, rtol=0)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(out)
    _ours(again)  # compressed-tensors decompresses int4 layers on the first forward
    for n, m in again.named_modules():
        if type(m) is torch.nn.Linear and n != "lm_head":
            assert (nm_counts(m.weight) <= 2).all(), n


def test_bitmask_layout_round_trips(tiny_model, tmp_path):
    from hf_memkit.export.checkpoint import export_model
    from hf_memkit.export.sparse import load_bitmask_state_dict
    from hf_memkit.prune.sparse24 import unpack_bitmask
    from hf_memkit.recipe import ExportConfig

    prune_model_(tiny_model, "magnitude_24")
    out = tmp_path / "bm"
    export_model(tiny_model, str(out), ExportConfig(format="compressed-tensors", sparse_layout="bitmask"),
                 model_card=False)
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["sparsity_config"]["format"] == "sparse-24-bitmask"
    from safetensors.torch import load_file

    raw = load_file(str(out / "model.safetensors"))
    masks = [k for k in raw if k.endswith(".bitmask")]
    assert masks
    for k in masks:
        cols = int(raw[k.replace("bitmask", "shape")][1])
        assert (nm_counts(unpack_bitmask(raw[k], cols)) == 2).all()
    state = load_bitmask_state_dict(str(out))
    want = tiny_model.state_dict()
    for k, v in want.items():
        if k in state:
            assert torch.equal(state[k], v), k
    assert all(f"{k.rsplit('.', 1)[0]}.weight" in state for k in masks)
