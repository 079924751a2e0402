"""Mesa on the tiny Llama: saved bytes, estimate, removal, training, state, errors."""

from __future__ import annotations

import pytest
import torch

from hf_memkit import load_recipe
from hf_memkit.activations.mesa.config import MesaConfig
from hf_memkit.activations.mesa.technique import MesaTechnique
from hf_memkit.errors import RecipeError
from hf_memkit.memory.estimate import estimate_memory
from hf_memkit.memory.profiler import SavedTensorMeter


def _model(path, attn):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    return m.train()


def _step(model, ids):
    meter = SavedTensorMeter(model, model.config.vocab_size)
    with meter.measure():
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), meter.bytes["activations"], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("attn,limit", [("eager", 0.30), ("sdpa", 0.40)])
def test_saved_bytes_and_gradients_on_the_tiny_llama(tiny_path, ids, attn, limit, capsys):
    base_loss, base_bytes, base_grads = _step(_model(tiny_path, attn), ids)
    model = _model(tiny_path, attn)
    technique = MesaTechnique()
    handle = technique.patch_model(model)
    loss, mesa_bytes, grads = _step(model, ids)
    assert torch.equal(loss, base_loss), "the forward is exact"
    for n, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), base_grads[n].flatten(), dim=0)
        assert cos > 0.995, n
    ratio = mesa_bytes / base_bytes
    with capsys.disabled():
        print(f"\n  mesa saved activations, {attn}: {mesa_bytes} of {base_bytes} bytes ({ratio:.1%})")
    assert ratio <= limit
    est = estimate_memory(model.config, load_recipe({"activations": [{"mesa": {}}]}), batch_size=4, seq_len=32)
    assert est.categories()["activations"] == pytest.approx(mesa_bytes, rel=0.02)
    if attn == "eager":
        assert any("softmax" in v for v in technique.covered.values())
        assert model.config._attn_implementation != "eager"
    handle.remove()
    assert model.config._attn_implementation == attn
    assert not any("forward" in vars(m) for m in model.modules())


def test_short_training_tracks_the_baseline(tiny_path, tiny_dataset):
    """40 steps of AdamW on the same batches: final loss within 2% of the baseline's. The 200-step/1% check of the
    issue is ``benchmarks/bench_activations.py --mesa-steps 200`` (slow on a shared CPU)."""

    batches = [torch.stack([torch.tensor(r["input_ids"]) for r in tiny_dataset.select(range(i, i + 4))])
               for i in range(0, 40, 4)]
    losses = {}
    for mesa in (False, True):
        torch.manual_seed(0)
        model = _model(tiny_path, "eager")
        handle = MesaTechnique().patch_model(model) if mesa else None
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(40):
            ids = batches[step % len(batches)]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            losses[mesa] = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
        if handle:
            handle.remove()
    assert losses[True] == pytest.approx(losses[False], rel=0.02), losses


def test_running_ranges_are_the_checkpoint_state(tiny_path, ids):
    model = _model(tiny_path, "eager")
    t = MesaTechnique()
    t.patch_model(model)
    _step(model, ids)
    state = t.state_dict()
    assert state["format"] == 1 and any(k.endswith("/alpha") for k in state)
    other = MesaTechnique()
    other.load_state_dict(state)  # before patching: kept until patch_model
    other.patch_model(_model(tiny_path, "eager"))
    again = other.state_dict()
    assert set(again) == set(state)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(again[k], v)


def test_bad_config_names_the_fix():
    with pytest.raises(RecipeError, match="bits: 8"):
        load_recipe({"activations": [{"mesa": {"bits": 4}}]})
    with pytest.raises(RecipeError, match="groups"):
        load_recipe({"activations": [{"mesa": {"groups": 0}}]})
    with pytest.raises(RecipeError, match="cover"):
        load_recipe({"activations": [{"mesa": {"cover": ["conv"]}}]})
    with pytest.raises(RecipeError, match="wta_crs"):
        load_recipe({"activations": [{"mesa": {}}, {"wta_crs": {}}]})
    assert MesaConfig().bits == 8
