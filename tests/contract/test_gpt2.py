"""The GPT-2 row of the composition matrix: every registered technique on a tiny GPT-2 (``Conv1D`` projections,
``transformer.h`` layers, learned position embeddings, a head tied to the token embedding). A technique either
trains there with every check of the pair matrix (:func:`tests.contract.test_pairs.check_combination`; the
estimator, which models Llama-family decoders, must refuse GPT-2 with its typed error), or refuses
the model with a typed error that names what it needs (:data:`REFUSES_GPT2`, kept honest: a refusal that stops
happening fails the test)."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.errors import IncompatibleModelError, MemkitError
from tests.contract.pairs import classified, for_matrix
from tests.contract.test_pairs import check_combination

_NO_LINEAR = "no nn.Linear layer to quantize; weight quantization needs plain torch.nn.Linear modules"
#: technique -> a fragment of the error it gives on GPT-2 (why it cannot run there): the quantizers, pruners and
#: Linear-kernel techniques work on ``nn.Linear`` only, GPT-2 projects with ``Conv1D``
REFUSES_GPT2: dict[str, str] = {
    "ast": "no plain nn.Linear layer to sparsify", "cast": "no plain nn.Linear layer to sparsify",
    "magnitude_24": "no plain nn.Linear layer to sparsify", "wanda_24": "no plain nn.Linear layer to sparsify",
    "fira": "selects only GPT-2 Conv1D layers", "sst": "selects no trainable nn.Linear",
    "lorc": "nn.Linear", "sparse_update": "match no nn.Linear inside decoder layer",
    "wta_crs": "match no Linear layer", "rtn": _NO_LINEAR, "gptq": _NO_LINEAR, "block_ap": _NO_LINEAR,
    "e2e_qp": _NO_LINEAR, "comp": "Llama-style MLPs only", "l1_structured": "Llama-style MLPs only",
}


def _singles():
    from hf_memkit import registry
    from hf_memkit.docs import _accepts, _recipe

    out = []
    for e in registry.entries():
        if e.origin != "builtin":
            continue
        d = _recipe((e,))
        if d is not None and _accepts(d):
            out.append((f"{e.slot}.{e.name}", for_matrix(d)))
    return out


SINGLES = _singles()
#: the techniques that train on GPT-2 (every single not refusing it)
TRAINS_GPT2 = {k.split(".", 1)[1] for k, _ in SINGLES} - set(REFUSES_GPT2)
GPT2_PAIRS = [(k, r) for k, r in classified()[0] if all(x.split(".", 1)[1] in TRAINS_GPT2 for x in k.split("+"))]


@pytest.fixture(scope="module")
def gpt2_model(tiny_tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=len(tiny_tokenizer),
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("recipe", [r for _, r in SINGLES], ids=[k for k, _ in SINGLES])
def test_gpt2(recipe, gpt2_model, tiny_dataset, tmp_path, request):
    name = request.node.callspec.id.split(".", 1)[1]
    try:
        check_combination(recipe, gpt2_model, tiny_dataset, tmp_path, estimator=False)
    except (IncompatibleModelError, MemkitError) as exc:
        if name not in REFUSES_GPT2:
            raise
        assert REFUSES_GPT2[name] in str(exc), str(exc)
        return
    assert name not in REFUSES_GPT2, f"{name} now runs on GPT-2: remove it from REFUSES_GPT2"


@pytest.mark.parametrize("recipe", [r for _, r in GPT2_PAIRS], ids=[k for k, _ in GPT2_PAIRS])
def test_gpt2_pair(recipe, gpt2_model, tiny_dataset, tmp_path):
    check_combination(recipe, gpt2_model, tiny_dataset, tmp_path, estimator=False)
