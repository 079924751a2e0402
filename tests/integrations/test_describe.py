"""Say what happened: the start-of-training block names what each technique did to this model, the Trainer's
trainable-parameter count and training_args.bin match what trains, and no temporary folder outlives a run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from hf_memkit import MemkitTrainer
from hf_memkit.data.recipes import bundled_recipes
from hf_memkit.recipe import load_recipe
from tests.conftest import make_args

#: bundled recipes that need several ranks (their engines are covered by tests/distributed)
DISTRIBUTED = {"zero2", "zero3_offload", "fsdp", "co2"}
#: what the block must say, per technique, on the tiny model
EXPECTED = {
    "lora": "LoRA r=",
    "qlora": "quantized 28 Linear layers to nf4",
    "lisa": "decoder layers train (now layers [",
    "adamw": "torch.AdamW over",
    "adamw_8bit": "bitsandbytes.AdamW8bit over",
    "offload": "go to disk",
    "mesa": "modules keep their saved activations in 8 bits",
}


def _block(trainer, caplog):
    with caplog.at_level(logging.INFO, logger="hf_memkit"):
        trainer.create_optimizer()
    lines = [r.getMessage() for r in caplog.records]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("hf_memkit: recipe "))
    end = next(i for i, ln in enumerate(lines) if "trainable now:" in ln)
    return lines[start:end + 1]


@pytest.mark.parametrize("name", sorted(set(bundled_recipes()) - DISTRIBUTED))
def test_the_start_block_names_each_technique_and_what_it_did(name, tiny_model, tiny_dataset, tmp_path, caplog):
    recipe = load_recipe(bundled_recipes()[name])
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path), train_dataset=tiny_dataset, recipe=recipe)
    block = _block(trainer, caplog)
    assert block[0].startswith(f"hf_memkit: recipe {recipe.source} on LlamaForCausalLM")
    body = block[1:-1]
    assert [ln.split()[1] for ln in body] == recipe.names()
    for line in body:
        slot, technique = line.split()[:2]
        assert slot == recipe.get(technique).slot
        if technique in EXPECTED:
            assert EXPECTED[technique] in line, line
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert f"trainable now: {trainable:,} of" in block[-1]


def test_lisa_freezes_its_inactive_layers_before_the_trainer_counts_trainable_parameters(
        tiny_model, tiny_dataset, tmp_path, caplog):
    recipe = {"optimizer": {"adamw": {}}, "schedule": [{"lisa": {"active_layers": 1}}]}
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path), train_dataset=tiny_dataset, recipe=recipe)
    total = sum(p.numel() for p in trainer.model.parameters())
    block = _block(trainer, caplog)
    layer = sum(p.numel() for p in tiny_model.model.layers[0].parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert trainable == total - layer  # what the Trainer's "Number of trainable parameters" banner prints next
    assert "1 of 2 decoder layers train" in block[2] or "1 of 2 decoder layers train" in " ".join(block)


def test_training_args_bin_records_the_recipes_optimizer(tiny_model, tiny_dataset, tmp_path):
    recipe = {"optimizer": {"adamw_8bit": {}}, "adapter": {"lora": {"r": 2}}}
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset,
                            recipe=recipe)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    saved = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert saved.optim_args == "hf_memkit: adamw_8bit (AdamW8bit)"


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra,code", [
    ("offload_disk", [], 0),
    ("qlora", [], 0),
    ("offload_disk", ["--learning_rate", "1000", "--max-steps", "8"], 1),  # a run the guard stops
])
def test_no_temporary_folder_outlives_a_run_or_a_failed_run(recipe, extra, code, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    r = subprocess.run([sys.executable, "-m", "hf_memkit.cli", "train", "--model", "tiny", "--recipe", recipe,
                        "--max-steps", "2", "--max-seq-len", "64", "--output-dir", str(tmp_path / "out"),
                        "--no-eval-before", *extra], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == code, r.stderr[-2000:]
    assert sorted(os.listdir(tmp)) == []


def test_the_card_and_the_compression_report_agree_on_the_calibration(tiny_model, tiny_dataset, tiny_tokenizer,
                                                                         tmp_path):
    """After training, gptq calibrates on the training batches (32 tokens here), not on the config's seq_len:
    the card says what the report says."""
    import json

    recipe = {"compress": [{"gptq": {"bits": 4, "group_size": 32, "num_samples": 4}}],
              "export": {"format": "compressed-tensors"}}
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset,
                            processing_class=tiny_tokenizer, recipe=recipe)
    trainer.train()
    used = json.loads((tmp_path / "compression_report.json").read_text())["pass"]["calibration"]
    assert "x 32 tokens" in used
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"calibration_used={used}" in card and "seq_len=512" not in card.split("## Recipe")[0]
