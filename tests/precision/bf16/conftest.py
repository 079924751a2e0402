import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: with several threads on a loaded machine, OpenMP's spin-waits dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
