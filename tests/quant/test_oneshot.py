"""`memkit compress MODEL --recipe FILE -o DIR` on the tiny model (a real subprocess), and its error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_memkit.cli import main


def test_help_lists_compress_and_export(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "memkit compress MODEL --recipe FILE -o DIR" in out and "memkit export   DIR [--push-to-hub REPO]" in out


@pytest.mark.slow
def test_memkit_compress_tiny_writes_a_loadable_export(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("memkit: 1\ncompress: [{gptq: {bits: 4, group_size: 32, num_samples: 8, seq_len: 64}}, "
                      "{lorc: {rank: 4}}]\nexport: {format: compressed-tensors}\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "hf_memkit.cli", "compress", "tiny", "--recipe", str(recipe), "-o",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "memkit compress: gptq, lorc -> compressed-tensors" in r.stdout and "perplexity (eval)" in r.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    for f in ("README.md", "model.safetensors", "tokenizer.json", "lorc_adapter/adapter_model.safetensors",
              "compression_report.json"):
        assert (out / f).is_file(), f
    report = json.loads((out / "compression_report.json").read_text())
    assert report["pass"]["calibration"] == "8 sequences x 64 tokens from the embedded corpus (train split)"


def test_memkit_compress_in_process(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("memkit: 1\ncompress: [{rtn: {bits: 4, group_size: 32}}, {lorc: {rank: 2}}]\n")
    assert main(["compress", "tiny", "--recipe", str(recipe), "-o", str(tmp_path / "out"), "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "rtn, lorc -> compressed-tensors" in out and "(not measured)" in out
    assert (tmp_path / "out" / "lorc_adapter" / "adapter_config.json").is_file()


def test_memkit_compress_runs_e2e_qp_as_a_short_training_run(tmp_path):
    from hf_memkit.quant.oneshot import compress

    recipe = {"compress": [{"rtn": {"bits": 2, "group_size": 32}}, {"e2e_qp": {}}],
              "training_args": {"max_steps": 2, "per_device_train_batch_size": 2}}
    summary = compress("tiny", recipe, str(tmp_path), evaluate=False, log=lambda _m: None)
    assert summary["format"] == "compressed-tensors" and summary["techniques"] == ["rtn", "e2e_qp"]
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert report["pass"]["e2e_qp"]["steps"] == 2
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 2


def test_memkit_compress_reports_bad_input_with_exit_codes(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("memkit: 1\ncompress: [{rtn: {bits: 5}}]\n")
    assert main(["compress", "tiny", "--recipe", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "compress[0].rtn.bits" in capsys.readouterr().err
    wide = tmp_path / "wide.yaml"
    wide.write_text("memkit: 1\ncompress: [{rtn: {group_size: 48}}]\n")
    assert main(["compress", "tiny", "--recipe", str(wide), "-o", str(tmp_path / "o")]) == 1
    assert "does not divide the input width" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
