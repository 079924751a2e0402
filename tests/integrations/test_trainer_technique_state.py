"""Every stateful technique validates what ``load_state_dict`` receives: a corrupted entry is a CheckpointError
naming the key and the bad value, never an AttributeError/KeyError or a silently different run.
(LISA through real checkpoints: tests/schedules/lisa/test_corrupt_state.py.)"""

from __future__ import annotations

import types

import pytest
import torch

from hf_memkit import CheckpointError, load_recipe
from hf_memkit.integrations.trainer import RecipeRuntime


def patched(recipe, model):
    runtime = RecipeRuntime(load_recipe(recipe))
    runtime.patch(model)
    return runtime.techniques[0]


def corrupt(state, key, value):
    out = dict(state)
    if value is KeyError:
        del out[key]
    else:
        out[key] = value
    return out


def check(technique, state, match):
    with pytest.raises(CheckpointError, match=match):
        technique.load_state_dict(state)


def test_sst(tiny_model):
    t = patched({"optimizer": {"sst": {"rank": 2}}}, tiny_model)
    state = {k: v.clone() for k, v in t.state_dict().items()}
    t.load_state_dict(state)  # the untouched state loads
    perm = next(k for k in state if k.endswith(".perm"))
    sigma = next(k for k in state if k.endswith(".sigma"))
    check(t, corrupt(state, perm, torch.zeros_like(state[perm])), rf"sst\.{perm} .* is not a permutation")
    check(t, corrupt(state, sigma, state[sigma].long()), rf"sst\.{sigma} .* dtype torch.int64")
    check(t, corrupt(state, sigma, [1.0]), rf"sst\.{sigma} = \[1.0\] is not a tensor")
    check(t, corrupt(state, sigma, torch.full_like(state[sigma], float("nan"))), "NaN")
    check(t, corrupt(state, sigma, KeyError), f"has no '{sigma}'")
    check(t, {**state, "model.extra.sigma": state[sigma]}, "does not have")


def test_mesa(tiny_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="eager")
    t = patched({"activations": [{"mesa": {}}]}, model)
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    state = t.state_dict()
    alpha = next(k for k in state if k.endswith("/alpha"))
    t.load_state_dict(state)
    check(t, corrupt(state, "format", 2), r"mesa\.format = 2")
    check(t, corrupt(state, alpha, -state[alpha]), "negative range width")
    check(t, corrupt(state, alpha, "wide"), "is not a tensor")
    check(t, corrupt(state, alpha, KeyError), "alpha")
    check(t, corrupt(state, alpha.replace("/alpha", "/gamma"), state[alpha]), "never has")


def test_sparse_update(tiny_model):
    t = patched({"schedule": [{"sparse_update": {"bias_layers": 1, "weight_layers": [-1], "weight_ratio": 0.25}}]},
                tiny_model)
    state = t.state_dict()
    plan = state["plan"]
    t.load_state_dict(state)
    name = next(iter(plan["channels"]))
    check(t, corrupt(state, "plan", {**plan, "bias_layers": -1}), r"plan\.bias_layers = -1 is outside")
    check(t, corrupt(state, "plan", {**plan, "channels": {name: [10_000]}}), rf"plan\.channels\.{name} .* 10000")
    check(t, corrupt(state, "plan", {**plan, "channels": {"no.such.module": [0]}}), "did not patch")
    check(t, corrupt(state, "plan", "bias"), r"sparse_update\.plan = 'bias' is not a mapping")
    check(t, corrupt(state, "plan", KeyError), "has no 'plan'")


@pytest.mark.parametrize("name", ["ast", "cast"])
def test_two_four_sparse_training(tiny_model, name):
    t = patched({"optimizer": {name: {}}}, tiny_model)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in t.state_dict().items()}
    mask = next(k for k in state if k.startswith("mask/"))
    t.load_state_dict(state)
    check(t, corrupt(state, mask, torch.ones_like(state[mask])), "is not a 2:4 mask")
    check(t, corrupt(state, mask, state[mask].float()), "dtype torch.float32")
    check(t, corrupt(state, mask, KeyError), f"has no '{mask}'")
    check(t, corrupt(state, "flips", -3), r"flips = -3 is outside")


def test_co2(tiny_model):
    from hf_memkit.distributed.co2.technique import CO2Technique

    t = CO2Technique()
    t.bind_trainer(types.SimpleNamespace(model=tiny_model))
    n = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    state = {"anchor": torch.zeros(n), "momentum": torch.zeros(n), "rounds": 3}
    t.load_state_dict(state)
    check(t, corrupt(state, "anchor", torch.zeros(n - 1)), rf"anchor .* has shape \({n - 1},\)")
    check(t, corrupt(state, "momentum", torch.zeros(4)), "momentum")
    check(t, corrupt(state, "rounds", "3"), r"rounds = '3' is not an integer")
    check(t, corrupt(state, "anchor", KeyError), "has no 'anchor'")
