"""transformers >= 5.25 re-kernelizes a model at every train()/eval() switch and strips instance ``forward``
attributes of kernel-decorated modules (RMSNorm): a patched model must keep its patches through the Trainer's
mode switches, and get its kernels back when the recipe is removed."""

from __future__ import annotations

import pytest
import torch


def _norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def test_patches_survive_train_and_eval_switches(tiny_model):
    from hf_memkit.integrations.trainer import RecipeRuntime
    from hf_memkit.recipe import load_recipe

    kernels_on = bool(getattr(tiny_model, "use_kernels", False))
    runtime = RecipeRuntime(load_recipe({"activations": [{"mesa": {}}]}))
    model = runtime.patch(tiny_model)
    for mode in (True, False, True):
        model.train(mode)
        assert all("forward" in vars(n) for n in _norms(model)), "a mode switch removed Mesa's RMSNorm patch"
    assert not getattr(model, "use_kernels", False)
    runtime.unpatch()
    assert not any("forward" in vars(n) for n in _norms(tiny_model))
    assert bool(getattr(tiny_model, "use_kernels", False)) == kernels_on


def test_mesa_saves_its_8_bit_norm_inputs_in_a_training_step(tiny_model):
    """The defining effect, end to end through model.train(): no fp32 RMSNorm input is saved for backward."""
    from hf_memkit.activations.mesa.technique import MesaTechnique

    handle = MesaTechnique().patch_model(tiny_model)
    tiny_model.train()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randint(0, 100, (2, 16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tiny_model(input_ids=x, labels=x).loss.backward()
    hidden = tiny_model.config.hidden_size
    fp32_hidden = [t for t in saved if t.dtype == torch.float32 and t.dim() == 3 and t.shape[-1] == hidden]
    assert fp32_hidden == [], [tuple(t.shape) for t in fp32_hidden]
    handle.remove()


def test_disable_is_a_no_op_without_kernels():
    from hf_memkit.integrations.hub_kernels import disable_hub_kernels

    assert disable_hub_kernels(torch.nn.Linear(2, 2), "test") is None
