from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from hf_memkit import IncompatibleModelError
from hf_memkit.optim import SST
from hf_memkit.optim.sst.layer import (
    SSTLinear,
    factor_state_dict,
    factorize_linears_,
    load_factor_state_dict_,
    sample_active,
    sampling_probabilities,
    sst_layers,
)
from hf_memkit.optim.sst.technique import SSTTechnique
from tests.conftest import make_args
from tests.optim.cosmos import trainer_checks as checks
from tests.optim.cosmos.trainer_checks import one_cpu_thread  # noqa: F401  (autouse fixture)


def _net(m=24, n=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, m), nn.Tanh(), nn.Linear(m, 3))


def _factored(rank=4, **kw):
    net = _net()
    original = copy.deepcopy(net)
    handle = factorize_linears_(net, ["0"], rank, **kw)
    return net, original, handle


def test_reconstructs_w_after_init_and_after_resvd():
    net, original, _ = _factored()
    layer = net[0]
    assert isinstance(layer, SSTLinear) and layer.k == 16 and layer.rank == 4
    assert (layer.merged_weight() - original[0].weight).abs().max() < 1e-5
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), original[0](x), rtol=1e-5, atol=1e-5)
    opt = SST(net, lr=5e-2, interval=1000)
    for _ in range(4):
        opt.zero_grad()
        (net(torch.randn(8, 16)) ** 2).mean().backward()
        opt.step()
    before = layer.merged_weight().clone()
    layer.resvd_()
    assert (layer.merged_weight() - before).abs().max() < 1e-5
    u, s, v = layer.full_factors()
    assert torch.allclose(u.T @ u, torch.eye(16), atol=1e-5) and torch.allclose(v.T @ v, torch.eye(16), atol=1e-5)
    assert torch.all(s[:-1] >= s[1:])


def test_enhanced_gradients_against_autograd_on_the_dense_weight():
    net, _, _ = _factored()
    layer = net[0]
    x = torch.randn(7, 16, requires_grad=True)
    out = layer(x)
    target = torch.randn_like(out)
    (out * target).sum().backward()
    # reference: the same layer as a dense weight, plain autograd
    w = layer.merged_weight().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(x2, w, layer.bias) * target).sum().backward()
    g = w.grad
    u, _, v = layer.full_factors()
    active = layer.perm[:4]
    torch.testing.assert_close(layer.u_active.grad, g @ v[:, active], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.v_active.grad, g.T @ u[:, active], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.sigma.grad, torch.einsum("mk,mn,nk->k", u, g, v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_only_the_sampled_pairs_train_and_stay_unit_norm():
    net, _, _ = _factored()
    layer = net[0]
    frozen = (layer.u_frozen.clone(), layer.v_frozen.clone())
    sigma, ua = layer.sigma.detach().clone(), layer.u_active.detach().clone()
    opt = SST(net, lr=1e-2, interval=1000)
    opt.zero_grad()
    (net(torch.randn(8, 16)) ** 2).mean().backward()
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {
        "sigma", "u_active", "v_active", "bias"}
    assert (layer.sigma.grad != 0).all()  # every singular value gets a gradient
    assert not layer.u_frozen.requires_grad and layer.u_frozen.grad is None
    opt.step()
    assert torch.equal(layer.u_frozen, frozen[0]) and torch.equal(layer.v_frozen, frozen[1])
    assert not torch.equal(layer.sigma, sigma) and not torch.equal(layer.u_active, ua)
    assert (layer.sigma >= 0).all()
    for t in (layer.u_active, layer.v_active):
        torch.testing.assert_close(t.norm(dim=0), torch.ones(4))
    state = opt.state[layer.u_active]
    assert state["exp_avg"].shape == (24, 4)  # optimizer state exists for the active pairs only


@pytest.mark.parametrize("distribution", ["mixed", "proportional", "uniform"])
def test_sampling_frequencies_match_the_distribution(distribution):
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.25, 0.25])
    p = sampling_probabilities(sigma, distribution)
    assert p.sum().item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.bincount(torch.cat([sample_active(sigma, 1, distribution, g) for _ in range(draws)]), minlength=8)
    expected = p.double() / p.double().sum() * draws
    statistic = ((counts.double() - expected) ** 2 / expected).sum()
    pvalue = torch.special.gammaincc(torch.tensor((len(sigma) - 1) / 2, dtype=torch.float64), statistic / 2)
    assert pvalue > 1e-3, (statistic, pvalue)  # chi-square goodness of fit, 7 degrees of freedom
    several = sample_active(sigma, 5, distribution, g)
    assert len(set(several.tolist())) == 5  # without replacement


def test_resample_swaps_pairs_resets_their_moments_and_keeps_w():
    net, _, _ = _factored()
    layer = net[0]
    opt = SST(net, lr=1e-2, interval=2, iterations_per_round=3, iteration_warmup=0)
    seen = set()
    for step in range(1, 7):
        opt.zero_grad()
        (net(torch.randn(8, 16)) ** 2).mean().backward()
        opt.step()
        if step % 2 == 0:
            assert opt.state[layer.u_active]["step"] == 0 and not opt.state[layer.u_active]["exp_avg"].any()
        seen.update(layer.perm[:4].tolist())
        if step == 6:  # end of round 1 (3 iterations): re-SVD'ed, Σ moments reset
            assert opt.state[layer.sigma]["step"] == 0
            u, _, _ = layer.full_factors()
            assert torch.allclose(u.T @ u, torch.eye(16), atol=1e-5)
    assert len(seen) > 4


def test_remove_restores_the_original_linear_exactly_or_merged_after_training():
    net, original, handle = _factored()
    assert handle.remove() is net
    assert type(net[0]) is nn.Linear and torch.equal(net[0].weight, original[0].weight)
    net, original, handle = _factored()
    opt = SST(net, lr=1e-2)
    (net(torch.randn(8, 16)) ** 2).mean().backward()
    opt.step()
    x = torch.randn(4, 16)
    factored_out = net(x)
    linear = handle.remove()[0]
    assert type(linear) is nn.Linear
    torch.testing.assert_close(net(x), factored_out, rtol=1e-5, atol=1e-6)


def test_checkpoints_are_plain_models_whose_outputs_equal_the_factored_ones(tiny_path, tiny_dataset, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_memkit import MemkitTrainer

    trainer = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path),
                            args=make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                            train_dataset=tiny_dataset, recipe={"optimizer": {"sst": {"rank": 8}}})
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    plain_keys = set(AutoModelForCausalLM.from_pretrained(tiny_path).state_dict())
    x = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        factored = trainer.model(input_ids=x).logits
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        assert set(load_file(folder / "model.safetensors")) == plain_keys
        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert not any(isinstance(m, SSTLinear) for m in plain.modules())
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=x).logits, factored, rtol=1e-4, atol=1e-5)


def test_loading_a_foreign_weight_refactorizes():
    net, original, _ = _factored()
    new = torch.randn(24, 16)
    net.load_state_dict({**original.state_dict(), "0.weight": new})
    assert (net[0].merged_weight() - new).abs().max() < 1e-5 and net[0].trained
    with pytest.raises(RuntimeError, match="Unexpected"):
        net.load_state_dict({**original.state_dict(), "0.sigma": torch.zeros(16)})


def test_plain_resume_across_resampling_and_resvd_equals_uninterrupted():
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]

    def build():
        net, _, handle = _factored(rank=4, seed=3)
        return net, SST(net, lr=1e-2, interval=2, iterations_per_round=2, iteration_warmup=1, seed=3)

    def steps(net, opt, xs):
        for x in xs:
            opt.zero_grad()
            (net(x) ** 2).mean().backward()
            opt.step()

    full, full_opt = build()
    steps(full, full_opt, batches)
    half, half_opt = build()
    steps(half, half_opt, batches[:3])  # 3 steps: mid-iteration, before a resample
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "factors": factor_state_dict(sst_layers(half)),
                "opt": half_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt = build()
    load_factor_state_dict_(sst_layers(resumed), saved["factors"])
    resumed.load_state_dict(saved["model"])  # merged weights equal the factors: kept as they are
    opt.load_state_dict(saved["opt"])
    steps(resumed, opt, batches[3:])
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert (a - b).abs().max() <= 1e-6, n


def test_trainer_resume_equals_uninterrupted(tiny_path, tiny_dataset, tmp_path):
    recipe = {"optimizer": {"sst": {"rank": 8, "interval": 1, "iterations_per_round": 2, "iteration_warmup": 1}}}
    checks.assert_trainer_resume_matches(tiny_path, tiny_dataset, tmp_path, recipe, n=3)


def test_bf16_autocast_accumulation_clipping(tiny_path, tiny_dataset, tmp_path):
    checks.assert_trains_in_bf16(tiny_path, tiny_dataset, tmp_path, {"optimizer": {"sst": {"rank": 8}}})


def test_bf16_model_trains_with_fp32_state(tiny_model):
    tiny_model.to(torch.bfloat16)
    factorize_linears_(tiny_model, "all-linear", 8)
    opt = SST(tiny_model, lr=1e-3)
    x = torch.randint(0, 500, (2, 16))
    tiny_model(input_ids=x, labels=x).loss.backward()
    opt.step()
    layer = next(iter(sst_layers(tiny_model).values()))
    assert layer.sigma.dtype == torch.bfloat16 and opt.state[layer.sigma]["exp_avg"].dtype == torch.float32


def test_estimate_is_exact_for_state_and_weights(tiny_model, tiny_dataset, tmp_path):
    from tests.conftest import measure_one_step

    est, measured = measure_one_step(tiny_model, tiny_dataset, {"optimizer": {"sst": {"rank": 8}}}, tmp_path)
    assert est["optimizer_states"] == measured["optimizer_states"]
    assert est["weights"] == measured["weights"] and est["gradients"] == measured["gradients"]
    assert est["activations"] == pytest.approx(measured["activations"], rel=0.02)


def test_trainable_state_on_smollm2_shaped_matrices():
    layer = checks.smollm2_layer()
    factorize_linears_(layer, "all-linear", 64)
    opt = SST(layer, lr=1e-3)
    checks.one_random_step(layer, opt)
    measured = checks.state_bytes(opt)
    expected = sum(8 * ((o + i) * 64 + min(o, i)) for o, i in checks.SMOLLM2_LAYER.values())
    assert measured == expected
    ratio = measured / checks.adamw_layer_state_bytes()
    assert ratio <= 0.5, ratio


def test_errors_are_typed():
    with pytest.raises(IncompatibleModelError, match="factorise the model first"):
        SST(_net(), lr=1e-3)
    with pytest.raises(IncompatibleModelError, match="target_modules"):
        factorize_linears_(_net(), ["nothing"], 4)
    net, _, _ = _factored()
    with pytest.raises(IncompatibleModelError, match="already"):
        factorize_linears_(net, ["2"], 4)
    from hf_memkit import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="distribution"):
        load_recipe({"optimizer": {"sst": {"distribution": "top"}}})
    with pytest.raises(RecipeError, match="adapter"):
        load_recipe({"optimizer": {"sst": {}}, "adapter": {"lora": {}}})


def test_technique_state_round_trip_checks_shapes(tiny_model):
    from hf_memkit import CheckpointError

    t = SSTTechnique()
    t.patch_model(tiny_model)
    state = {k: v.clone() for k, v in t.state_dict().items()}
    t.load_state_dict(state)
    key = next(k for k in state if k.endswith(".u_active"))
    with pytest.raises(CheckpointError, match="rank"):
        t.load_state_dict({**state, key: torch.zeros(3, 3)})
