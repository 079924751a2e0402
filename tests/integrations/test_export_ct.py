"""compressed-tensors export: exact packing, checkpoints that plain transformers loads in a fresh process with the
same logits, on-disk size, model card, and a Hub push that is only planned (nothing touches the network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_memkit import MemkitTrainer
from hf_memkit.errors import IncompatibleModelError
from hf_memkit.export.compressed_tensors import (
    pack_codes,
    quantized_bytes_on_disk,
    unpack_codes,
)
from hf_memkit.export.checkpoint import export_model
from hf_memkit.compress.grid import QuantSpec, storage_bits
from hf_memkit.compress.linear import quantized_modules
from hf_memkit.recipe import ExportConfig
from tests.conftest import make_args

CT = ExportConfig(format="compressed-tensors")
IDS = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 11, 300, 2, 64, 128, 77, 1, 9, 480]])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(8, 64), (5, 96), (3, 40)])
def test_pack_then_unpack_is_exact(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], -(-shape[1] * bits // 32))
    assert torch.equal(unpack_codes(packed, bits, shape), codes)
    packed0 = pack_codes(codes, bits, packed_dim=0)  # zero points are packed along the output dimension
    assert torch.equal(unpack_codes(packed0, bits, shape, packed_dim=0), codes)


def _quantized(tiny_path, tiny_tokenizer, quantizer, settings, lorc=None):
    from transformers import AutoModelForCausalLM

    from hf_memkit.compress.calibration import from_corpus
    from hf_memkit.quant.lorc.config import LorcCompensatorConfig
    from hf_memkit.quant.pipeline import default_config, quantize_model_

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    cfg = default_config(quantizer).model_copy(update=settings)
    calib = from_corpus(tiny_tokenizer, 8, 32) if quantizer == "gptq" else None
    quantize_model_(model, quantizer, cfg, lorc=LorcCompensatorConfig(**lorc) if lorc else None, calibration=calib)
    return model


CASES = {
    "gptq_w4g32_lorc_int8": ("gptq", {"bits": 4, "group_size": 32}, {"rank": 4, "factor_bits": 8}),
    "rtn_w3_channel_sym": ("rtn", {"bits": 3, "group_size": None, "symmetric": True}, None),
    "rtn_w2g16": ("rtn", {"bits": 2, "group_size": 16}, None),
    "rtn_w8g32_sym": ("rtn", {"bits": 8, "group_size": 32, "symmetric": True}, None),
    "rtn_g128_sym_mixed_grids": ("rtn", {"symmetric": True}, None),  # 64-wide layers fall back to per-channel
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_path, tiny_tokenizer, tiny_dataset):
    """Every case exported, with the logits of the in-memory quantized model it came from."""
    root = tmp_path_factory.mktemp("ct")
    out = {}
    for name, (q, settings, lorc) in CASES.items():
        model = _quantized(tiny_path, tiny_tokenizer, q, settings, lorc)
        folder = root / name
        export_model(model, str(folder), CT, tokenizer=tiny_tokenizer, model_card=lorc is not None)  # one is enough
        with torch.no_grad():
            torch.save(model(IDS).logits, root / f"{name}.logits.pt")
        out[name] = (folder, model, lorc is not None)
    # E2E-QP: trained scales of a training-time QuantLinear, exported by the run itself (finalize)
    from transformers import AutoModelForCausalLM

    run = root / "e2e_run"
    trainer = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path),
                            args=make_args(run, max_steps=1, learning_rate=1e-3), train_dataset=tiny_dataset,
                            processing_class=tiny_tokenizer,
                            recipe={"compress": [{"rtn": {"group_size": 32}}, {"e2e_qp": {}}],
                                    "export": {"format": "compressed-tensors"}})
    trainer.train()
    with torch.no_grad():
        torch.save(trainer.model(IDS).logits, root / "e2e_qp_trained.logits.pt")
    out["e2e_qp_trained"] = (run / "export", trainer.model, False)
    return root, out


FRESH = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    root, cases = sys.argv[1], json.loads(sys.argv[2])
    ids = torch.tensor(json.loads(sys.argv[3]))
    result = {}
    for name, folder, lorc in cases:
        model = AutoModelForCausalLM.from_pretrained(folder)
        if lorc:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, folder + "/lorc_adapter")
        with torch.no_grad():
            got = model(ids).logits
        want = torch.load(f"{root}/{name}.logits.pt")
        result[name] = float((got - want).abs().max())
    result["hf_memkit imported"] = any(m.split(".")[0] == "hf_memkit" for m in sys.modules)
    print("RESULT " + json.dumps(result))
""")


def test_exported_checkpoints_load_in_a_fresh_process_with_plain_transformers(exports):
    root, out = exports
    cases = [[name, str(folder), lorc] for name, (folder, _m, lorc) in out.items()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", FRESH, str(root), json.dumps(cases), json.dumps(IDS.tolist())],
                       capture_output=True, text=True, timeout=600, cwd=str(root), env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result.pop("hf_memkit imported") is False
    assert set(result) == set(out)
    for name, diff in result.items():
        assert diff <= 1e-4, (name, diff)


def test_config_json_carries_the_quantization_config(exports):
    _root, out = exports
    folder, model, _ = out["gptq_w4g32_lorc_int8"]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    expected = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    assert {k: group["weights"][k] for k in expected} == expected
    mixed = json.loads((out["rtn_g128_sym_mixed_grids"][0] / "config.json").read_text())["quantization_config"]
    strategies = sorted(g["weights"]["strategy"] for g in mixed["config_groups"].values())
    assert strategies == ["channel", "group"]
    sym = json.loads((out["rtn_w3_channel_sym"][0] / "config.json").read_text())["quantization_config"]
    assert "dequantize" not in sym  # symmetric checkpoints use transformers' default (compressed) path


def test_quantized_layers_on_disk_match_bits_times_weights_plus_scales_and_zero_points(exports):
    _root, out = exports
    for name, (folder, model, _lorc) in out.items():
        layers = quantized_modules(model)
        on_disk = quantized_bytes_on_disk(str(folder), [n for n, _m, _q in layers])
        expected = sum(storage_bits(qw.spec, *qw.shape, qw.scale.element_size()) for _n, _m, qw in layers) / 8
        assert on_disk == pytest.approx(expected, rel=0.05), name


def test_lorc_factors_are_a_peft_lora_adapter_with_scaling_one(exports):
    _root, out = exports
    folder = out["gptq_w4g32_lorc_int8"][0] / "lorc_adapter"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 4 and cfg["lora_dropout"] == 0
    assert len(cfg["target_modules"]) == 14


def test_model_card_names_recipe_versions_perplexity_and_size(exports):
    _root, out = exports
    card = (out["e2e_qp_trained"][0] / "README.md").read_text()
    for text in ("compressed-tensors", "| rtn | 1 |", "| e2e_qp | 1 |", "## Recipe", "e2e_qp: {}", "perplexity", "MB",
                 "AutoModelForCausalLM.from_pretrained"):
        assert text in card, text
    info = json.loads((out["e2e_qp_trained"][0] / "memkit_export.json").read_text())
    assert info["metrics"]["perplexity"] > 1 and info["metrics"]["bytes_on_disk"] < info["metrics"]["bytes_full_precision"]
    lorc_card = (out["gptq_w4g32_lorc_int8"][0] / "README.md").read_text()
    assert "PeftModel.from_pretrained" in lorc_card and "LoRC r4" in lorc_card


def test_the_run_exports_once_and_the_safetensors_export_does_not_overwrite_it(exports):
    _root, out = exports
    folder = out["e2e_qp_trained"][0]
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert (folder.parent / "compression_report.json").is_file()


def test_safetensors_format_writes_dequantized_weights_with_lorc_folded_in(tiny_path, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _quantized(tiny_path, tiny_tokenizer, "rtn", {"bits": 4, "group_size": 32}, {"rank": 4})
    export_model(model, str(tmp_path), ExportConfig(format="safetensors"))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not quantized_modules(dense)
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


def test_export_of_an_unquantized_model_is_refused(tiny_model, tmp_path):
    with pytest.raises(IncompatibleModelError, match="needs a quantized model"):
        export_model(tiny_model, str(tmp_path), CT)


def test_asymmetric_mixed_grids_are_refused_before_training(tiny_model, tiny_dataset, tmp_path):
    recipe = {"compress": [{"rtn": {}}], "export": {"format": "compressed-tensors"}}  # g128 on 64-wide layers
    with pytest.raises(IncompatibleModelError, match="2 different grids.*symmetric: true"):
        MemkitTrainer(model=tiny_model, args=make_args(tmp_path), train_dataset=tiny_dataset, recipe=recipe)


class FakeHfApi:
    """Records what would be uploaded; has no network code at all."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        FakeHfApi.calls.append(("create_repo", repo_id, private))
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, repo_type, folder_path, allow_patterns, commit_message):
        FakeHfApi.calls.append(("upload_folder", repo_id, folder_path, sorted(allow_patterns)))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


def test_memkit_export_push_to_hub_uploads_exactly_the_export(exports, monkeypatch, capsys):
    import huggingface_hub

    from hf_memkit.cli import main

    _root, out = exports
    folder = out["gptq_w4g32_lorc_int8"][0]
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    assert main(["export", str(folder), "--push-to-hub", "someone/tiny-w4-lorc"]) == 0
    (_, repo, private), (_, repo2, path, files) = FakeHfApi.calls
    assert repo == repo2 == "someone/tiny-w4-lorc" and private is None and path == str(folder)
    for f in ("config.json", "model.safetensors", "README.md", "lorc_adapter/adapter_config.json",
              "lorc_adapter/adapter_model.safetensors", "tokenizer.json"):
        assert f in files
    assert all(not f.startswith(".") for f in files)
    assert "someone/tiny-w4-lorc" in (folder / "README.md").read_text()  # the card names the repo it goes to
    assert "pushed" in capsys.readouterr().out


def test_memkit_export_finds_a_runs_export_and_rejects_an_empty_folder(exports, tmp_path, capsys):
    from hf_memkit.cli import main

    _root, out = exports
    run_dir = out["e2e_qp_trained"][0].parent
    assert main(["export", str(run_dir)]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    assert main(["export", str(tmp_path)]) == 1
    assert "holds no exported model" in capsys.readouterr().err


def test_a_failed_push_is_reported_not_raised(exports, monkeypatch, capsys):
    import huggingface_hub

    from hf_memkit.cli import main

    class Offline(FakeHfApi):
        def create_repo(self, **kw):
            raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    folder = exports[1]["rtn_w2g16"][0]
    assert main(["export", str(folder), "--push-to-hub", "someone/x"]) == 1
    assert "failed: ConnectionError: offline" in capsys.readouterr().err
