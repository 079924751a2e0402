"""The tensor-by-tensor layout the activation techniques estimate from sums to the estimator's own model."""

import pytest

from hf_memkit.activations.saved_layout import saved_tensors
from hf_memkit.memory.estimate import estimate_memory


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layout_sums_to_the_activation_estimate(tiny_path, dtype):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_path)
    mem = estimate_memory(config, None, batch_size=3, seq_len=40, dtype=dtype)
    assert sum(s.bytes for s in saved_tensors(mem, config)) == mem.categories()["activations"]
