"""Model cards that say what happened (hf_memkit/export/card.py): every kind of saved model — `memkit train`'s
output, a script's final save_model under a recipe, `memkit compress`'s export — has a card that
huggingface_hub.ModelCard.load reads, with the Hub metadata (base_model as a Hub id or absent, co2_eq_emissions from
the measured energy), the recipe, and no path of this machine."""

from __future__ import annotations

import os

import pytest

from hf_memkit.export.card import SMOLLM2_HUB_ID, base_model_id


def _load(folder):
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(folder, "README.md"))
    return card, card.data.to_dict()


def _no_local_paths(text, *paths):
    from pathlib import Path

    import hf_memkit
    from hf_memkit.data.models import cache_dir

    for p in (*paths, cache_dir(), Path(hf_memkit.__file__).parent.parent, Path.home(), "/tmp/"):
        assert str(p) not in text, f"a local path ({p}) is in the card"
    assert "[More Information Needed]" not in text  # PEFT's empty template is gone


def test_base_model_is_a_hub_id_or_nothing(tmp_path, monkeypatch):
    from hf_memkit.data import models

    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path)
    smol = tmp_path / "smollm2-135m-instruct-bf16"
    smol.mkdir()
    assert base_model_id(name_or_path=str(smol)) == SMOLLM2_HUB_ID
    assert base_model_id(name_or_path="SmolLM2-135M-Instruct") == SMOLLM2_HUB_ID
    assert base_model_id(name_or_path="meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    other = tmp_path / "my-model"
    other.mkdir()
    assert base_model_id(name_or_path=str(other)) is None  # a folder of this machine is never written
    assert base_model_id(name_or_path="/abs/path/that/does/not/exist") is None
    (other / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# x\n")
    assert base_model_id(name_or_path=str(other)) == SMOLLM2_HUB_ID  # a run's output names its own base


def test_memkit_train_writes_a_card_with_emissions_and_the_recipe(tiny_path, tmp_path):
    pytest.importorskip("codecarbon")
    from hf_memkit.train import TrainOptions, train

    out = tmp_path / "out"
    summary = train(TrainOptions(model=str(tiny_path), recipe="default", max_steps=2, max_seq_len=32,
                                 output_dir=str(out), eval_before=False, country="FRA",
                                 extra=["--per_device_train_batch_size", "2"]))
    assert summary["energy"]["measured"] and summary["energy"]["country_iso_code"] == "FRA"
    assert summary["energy"]["energy_j_per_1k_tokens"] > 0
    card, meta = _load(out)
    assert "base_model" not in meta  # a random test model has no Hub id
    assert meta["library_name"] == "peft" and {"hf_memkit", "lora", "cce"} <= set(meta["tags"])
    co2 = meta["co2_eq_emissions"]
    assert co2["emissions"] == pytest.approx(summary["energy"]["co2eq_g"]) and "codecarbon" in co2["source"]
    assert co2["training_type"] == "fine-tuning" and co2["geographical_location"] == "FRA"
    assert "## Recipe" in card.text and "lora:" in card.text and "`memkit train`" in card.text
    _no_local_paths(card.content, tmp_path, tiny_path)


def test_a_scripts_final_save_gets_a_card_and_checkpoints_do_not(tiny_model, tiny_dataset, tmp_path, monkeypatch):
    pytest.importorskip("codecarbon")
    from hf_memkit import MemkitTrainer
    from tests.conftest import make_args

    monkeypatch.setenv("HF_MEMKIT_ENERGY", "1")
    args = make_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1)
    trainer = MemkitTrainer(model=tiny_model, args=args, train_dataset=tiny_dataset,
                            recipe={"adapter": {"lora": {"r": 4}}})
    trainer.train()
    ckpt_card = tmp_path / "run" / "checkpoint-1" / "README.md"
    assert not ckpt_card.exists() or "fine-tuned with hf_memkit" not in ckpt_card.read_text()  # checkpoints: none
    trainer.save_model(str(tmp_path / "final"))
    card, meta = _load(tmp_path / "final")
    assert meta["co2_eq_emissions"]["emissions"] > 0 and meta["library_name"] == "peft"
    assert "a script with an hf_memkit recipe" in card.text and "lora" in card.text
    _no_local_paths(card.content, tmp_path)


def test_memkit_compress_export_card_has_emissions_and_no_local_path(tmp_path):
    pytest.importorskip("codecarbon")
    from hf_memkit.quant.oneshot import compress

    out = tmp_path / "q"
    summary = compress("tiny", {"compress": [{"rtn": {"bits": 4, "group_size": 32}}]}, str(out), evaluate=False,
                       log=lambda _m: None, country="USA")
    assert summary["energy"]["measured"]
    card, meta = _load(out)
    assert meta["co2_eq_emissions"]["training_type"] == "compression (post-training)"
    assert {"hf_memkit", "rtn", "compressed-tensors"} <= set(meta["tags"]) and "base_model" not in meta
    assert "rtn" in card.text
    _no_local_paths(card.content, tmp_path)
