"""TRL trainers are Trainer subclasses: apply_recipe and the launcher's patch reach them too."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")


def _sft(model, tok, ds, tmp_path, **kw):
    from trl import SFTConfig, SFTTrainer

    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                    save_strategy="no", logging_steps=1, learning_rate=1e-2, disable_tqdm=True,
                    dataloader_pin_memory=False, max_length=32, bf16=False, **kw)
    return SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)


@pytest.fixture
def text_dataset():
    from datasets import Dataset

    from hf_memkit.data.corpus import split_topics

    train, _ = split_topics()
    return Dataset.from_dict({"text": [t[:200] for t in train[:32]]})


def test_apply_recipe_to_sft_trainer(tiny_model, tiny_tokenizer, text_dataset, tmp_path):
    from hf_memkit import apply_recipe

    trainer = _sft(tiny_model, tiny_tokenizer, text_dataset, tmp_path)
    apply_recipe(trainer, {"optimizer": {"adamw_8bit": {}}, "adapter": {"lora": {"r": 4}}})
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    assert any(not torch.equal(p, lora[n]) for n, p in trainer.model.named_parameters() if n in lora)


def test_launcher_patch_reaches_sft_trainer(tiny_model, tiny_tokenizer, text_dataset, tmp_path):
    from hf_memkit import load_recipe
    from hf_memkit.integrations.launcher import recipe_installed

    with recipe_installed(load_recipe({"adapter": {"lora": {"r": 2}}})):
        trainer = _sft(tiny_model, tiny_tokenizer, text_dataset, tmp_path)
    assert trainer.memkit is not None
    assert type(trainer.model).__name__ == "PeftModelForCausalLM"
    assert trainer.train().global_step == 2
