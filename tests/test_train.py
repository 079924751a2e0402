from __future__ import annotations

import json
import subprocess
import sys

from hf_memkit.train import TrainOptions, train


def test_train_accepts_a_local_model_folder_and_recipe_file(tiny_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("memkit: 1\noptimizer: {adamw: {lr: 0.01}}\ntraining_args: {logging_steps: 1}\n")
    summary = train(TrainOptions(model=str(tiny_path), recipe=str(recipe), max_steps=3, max_seq_len=32,
                                 output_dir=str(tmp_path / "out"), extra=["--per_device_train_batch_size", "2"]))
    assert summary["steps"] == 3 and summary["train_tokens"] == 3 * 2 * 32
    assert summary["techniques"] == ["adamw", "divergence_guard"]  # memkit train adds the guard
    assert summary["perplexity_after"] < summary["perplexity_before"]
    # a full fine-tune: every parameter trains and the whole model is saved
    assert (tmp_path / "out" / "model.safetensors").is_file()
    report = json.loads((tmp_path / "out" / "memory_report.json").read_text())
    assert report["measured"]["optimizer_states"] == report["estimate"]["optimizer_states"]
    assert report["measured"]["gradients"] == report["estimate"]["gradients"]


def test_import_is_cheap():
    code = ("import sys, hf_memkit; hf_memkit.load_recipe({'adapter': {'lora': {}}, 'optimizer': {'adamw': {}}});"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
