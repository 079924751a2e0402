"""LISA with ``always_train: [lm_head, final_norm]`` on a model with tied embeddings: the shared matrix trains
from the head's gradient only, and the frozen prefix saves nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

from hf_memkit import MemkitTrainer
from hf_memkit.schedules.lisa.config import LisaConfig
from hf_memkit.schedules.lisa.technique import LisaTechnique
from tests.conftest import make_args, measure_one_step

HEAD_ONLY = ["lm_head", "final_norm"]


def tied_model(seed: int = 0, layers: int = 6):
    from hf_memkit.data.models import tiny_dir

    config = LlamaConfig.from_pretrained(tiny_dir())
    config.num_hidden_layers = layers
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def lisa(**kw):
    return {"schedule": [{"lisa": {"active_layers": 2, "always_train": HEAD_ONLY, **kw}}]}


def test_the_tied_matrix_gets_the_head_gradient_only():
    """Reference in plain autograd: full gradient of the tied matrix minus its input-side part, which is the
    gradient w.r.t. the embedding output scattered onto the rows of the batch's tokens."""
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 16))
    ref = tied_model()
    emb_out = {}
    ref.model.embed_tokens.register_forward_hook(lambda m, a, out: emb_out.setdefault("t", out))
    loss = ref(input_ids=ids, labels=ids).loss
    d_emb_out, = torch.autograd.grad(loss, emb_out["t"], retain_graph=True)
    loss.backward()
    input_side = torch.zeros_like(ref.lm_head.weight).index_add_(0, ids.flatten(), d_emb_out.flatten(0, 1))
    expected = ref.lm_head.weight.grad - input_side
    assert input_side.abs().max() > 1e-4  # the control: the dropped part is not negligible

    model = tied_model()
    handle = LisaTechnique(LisaConfig(active_layers=2, always_train=HEAD_ONLY)).patch_model(model)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=1e-4, atol=1e-6)
    # every layer still trains (LISA freezes layers from on_train_begin): their gradients are the full ones
    for (n, p), (_, q) in zip(model.model.layers.named_parameters(), ref.model.layers.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    handle.remove()
    assert not model.model.embed_tokens._forward_hooks  # the cut is undone with the patch


def test_untied_model_needs_no_cut():
    from hf_memkit.integrations.anatomy import find_decoder_layers
    from hf_memkit.schedules.lisa.technique import _input_side_cut
    from tests.schedules.conftest import six_layer_model

    untied = six_layer_model()
    assert _input_side_cut(untied, find_decoder_layers(untied, None, "k"), HEAD_ONLY, "k") is None
    tied = tied_model()
    layers = find_decoder_layers(tied, None, "k")
    assert _input_side_cut(tied, layers, HEAD_ONLY, "k") is tied.model.embed_tokens
    assert _input_side_cut(tied, layers, ["embeddings", *HEAD_ONLY], "k") is None


def test_frozen_prefix_saves_nothing_and_estimate_matches(tmp_path, tiny_dataset, monkeypatch):
    """The estimate is the worst case (the bottom γ layers active), met exactly when those are drawn; a higher
    draw saves less, and both save less than the same run with the embeddings training."""
    from hf_memkit.memory.report import MEASURED
    from hf_memkit.schedules.lisa.sampler import LayerSampler

    monkeypatch.setattr(LayerSampler, "draw", lambda self: [0, 1])
    est, bottom = measure_one_step(tied_model(), tiny_dataset, lisa(), tmp_path / "bottom")
    for cat in MEASURED:
        assert est.get(cat, 0) == pytest.approx(bottom[cat], rel=0.02, abs=1024), cat
    monkeypatch.setattr(LayerSampler, "draw", lambda self: [4, 5])
    _, top = measure_one_step(tied_model(), tiny_dataset, lisa(), tmp_path / "top")
    _, default = measure_one_step(tied_model(), tiny_dataset, lisa(always_train=["embeddings", *HEAD_ONLY]),
                                  tmp_path / "default")
    assert top["activations"] < 0.5 * bottom["activations"] < bottom["activations"] < default["activations"]


class ActiveGrads(TrainerCallback):
    def __init__(self):
        self.ok: list[bool] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        for layer in model.model.layers:
            params = list(layer.parameters())
            if all(p.requires_grad for p in params):
                self.ok.append(all(p.grad is not None and p.grad.abs().sum() > 0 for p in params))
        self.ok.append(model.lm_head.weight.grad is not None)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_checkpointing"])
def test_active_layers_train_through_the_trainer(checkpointing, tmp_path, tiny_dataset):
    cb = ActiveGrads()
    recipe = {**lisa(interval=2), "training_args": {"gradient_checkpointing": checkpointing}}
    trainer = MemkitTrainer(model=tied_model(), args=make_args(tmp_path, max_steps=3), train_dataset=tiny_dataset,
                            callbacks=[cb], recipe=recipe)
    trainer.train()
    assert len(cb.ok) == 3 * 3 and all(cb.ok)
