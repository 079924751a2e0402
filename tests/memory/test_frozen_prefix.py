"""The frozen-prefix correction against the saved-tensor meter: with frozen embeddings, what a 6-layer Llama
saves for backward depends on where the first trainable parameter sits."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.memory.estimate import estimate_memory
from hf_memkit.memory.profiler import SavedTensorMeter
from hf_memkit.memory.frozen_prefix import frozen_prefix_correction
from tests.schedules.conftest import six_layer_model

CASES = [
    ["model.embed_tokens"],  # everything requires grad: no correction
    ["model.layers.4."],
    ["model.layers.4.input_layernorm"],
    ["model.layers.4.post_attention_layernorm"],
    ["model.layers.4.self_attn.o_proj"],
    ["model.layers.4.mlp.down_proj"],
    ["model.layers.5.mlp.up_proj", "model.layers.2.self_attn.v_proj"],
    ["lm_head"],
    ["model.norm"],
]


@pytest.mark.parametrize("train", CASES, ids=lambda t: "+".join(t))
def test_estimate_with_correction_equals_the_meter(train):
    model = six_layer_model()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    for n, p in model.named_parameters():
        p.requires_grad_(any(n.startswith(t) for t in train))
    meter = SavedTensorMeter(model, model.config.vocab_size)
    with meter.measure():
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()

    mem = estimate_memory(model.config, None, batch_size=4, seq_len=32)
    for n, p in mem.params.items():  # the hook's view: the same trainable flags, before activations are added
        p.trainable = any(n.startswith(t) for t in train)
    mem.terms = [t for t in mem.terms if t.category != "activations"]
    from hf_memkit.memory.activations import add_activation_terms

    over = frozen_prefix_correction(mem, model.config)
    add_activation_terms(mem, model.config)
    estimated = mem.categories()["activations"] - over
    assert estimated == pytest.approx(meter.bytes["activations"], abs=64)
    assert (over == 0) == (train == ["model.embed_tokens"])
