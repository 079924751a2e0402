import pytest
import torch


@pytest.fixture
def tied_model():
    """A tiny Llama whose embedding and lm_head share one weight (as SmolLM2's do)."""
    from transformers import LlamaForCausalLM

    from hf_memkit.data.models import tiny_config

    cfg = tiny_config()
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def bf16_representable_(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
