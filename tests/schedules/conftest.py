"""Fixtures of the schedule tests: a 6-layer tiny Llama (the 2-layer session model is too shallow to sample
layers from) and a callback that records what trains at every optimizer step."""

from __future__ import annotations

import pytest


def six_layer_model(seed: int = 0, layers: int = 6):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_memkit.data.models import tiny_dir

    config = LlamaConfig.from_pretrained(tiny_dir())
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture
def model6():
    return six_layer_model()


@pytest.fixture(scope="session")
def model6_state():
    """The initial weights, so that two runs in one test start from the same model."""
    return {k: v.clone() for k, v in six_layer_model().state_dict().items()}


def fresh_model6(state):
    model = six_layer_model()
    model.load_state_dict(state)
    return model
