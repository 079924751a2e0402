from __future__ import annotations

import pytest

from hf_memkit import estimate_memory
from hf_memkit.data.models import tiny_config


def test_base_terms_from_the_config_without_weights():
    cfg = tiny_config()
    mem = estimate_memory(cfg, {}, batch_size=2, seq_len=32)
    n = 512 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    cats = mem.categories()
    inv_freq = 2 * (16 // 2) * 4  # RoPE buffers inv_freq and original_inv_freq, head_dim / 2 fp32 each
    assert cats["weights"] == 4 * n + inv_freq
    assert cats["gradients"] == 4 * n
    assert cats["optimizer_states"] == 8 * n  # stock Trainer default: AdamW
    assert cats["logits"] == 2 * 32 * 512 * 4  # fp32 log-probabilities saved by the loss
    assert cats["loss_buffers"] == 2 * 32 * 512 * 8  # logits + their gradient, transient
    assert all(p.device.type == "meta" for p in mem.model.parameters())
    assert mem.total_bytes() == sum(cats.values())


def test_tied_embeddings_are_counted_once():
    cfg = tiny_config()
    cfg.tie_word_embeddings = True
    untied = estimate_memory(tiny_config(), {}).categories()["weights"]
    tied = estimate_memory(cfg, {}).categories()["weights"]
    assert untied - tied == 512 * 64 * 4


def test_gradient_checkpointing_shrinks_activations():
    plain = estimate_memory("tiny", {}, batch_size=4, seq_len=128).categories()["activations"]
    ckpt = estimate_memory("tiny", {"training_args": {"gradient_checkpointing": True}}, batch_size=4,
                           seq_len=128).categories()["activations"]
    assert ckpt < plain


def test_bad_dtype_is_an_error():
    with pytest.raises(ValueError, match="dtype"):
        estimate_memory("tiny", {}, dtype="int3")


def test_smollm2_config_comes_from_gguf_metadata():
    mem = estimate_memory("smollm2", "baseline", batch_size=1, seq_len=16)
    assert mem.model.config.hidden_size == 576
    # 134.5M parameters (embeddings tied with the head), fp32
    assert mem.categories()["weights"] == pytest.approx(134_515_008 * 4, rel=1e-6)


def test_zero_stages_partition_their_categories():
    one = estimate_memory("tiny", "baseline", batch_size=2, seq_len=32).categories()
    for stage, parted in ((1, {"optimizer_states"}), (2, {"optimizer_states", "gradients"}),
                          (3, {"optimizer_states", "gradients", "weights"})):
        four = estimate_memory("tiny", "baseline", batch_size=2, seq_len=32, world_size=4,
                               zero_stage=stage).categories()
        for cat, b in one.items():
            assert four[cat] == (-(-b // 4) if cat in parted else b), (stage, cat)
    with pytest.raises(ValueError, match="ZeRO stage"):
        estimate_memory("tiny", {}, zero_stage=4)
