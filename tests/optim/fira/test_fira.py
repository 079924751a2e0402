from __future__ import annotations

import math

import pytest
import torch

from hf_memkit import IncompatibleModelError
from hf_memkit.optim import Fira
from hf_memkit.optim.fira import optimizer as fira_mod
from hf_memkit.optim.fira.config import FiraConfig
from hf_memkit.optim.fira.optimizer import fira_param_groups, fira_state_numel, limit_growth_, scaled_residual
from hf_memkit.optim.fira.technique import FiraTechnique
from tests.conftest import make_args
from tests.optim.cosmos import trainer_checks as checks
from tests.optim.cosmos.trainer_checks import one_cpu_thread  # noqa: F401  (autouse fixture)


def _matrix_opt(m=64, n=48, **kw):
    w = torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(1)))
    return w, Fira([{"params": [w], "fira": True}], **kw)


def _grads(shape, count, seed=0, growth=1.0):
    g = torch.Generator().manual_seed(seed)
    return [growth**i * torch.randn(*shape, generator=g) for i in range(count)]


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_residual_norm_never_grows_faster_than_gamma(shape):
    w, opt = _matrix_opt(*shape, rank=8, update_proj_gap=3, limiter=1.01)
    norms = []
    for g in _grads(shape, 10, growth=1.5):  # the raw residual grows 1.5x per step: the limiter must hold it
        w.grad = g
        opt.step()
        norms.append(opt.state[w]["residual_norm"].item())
    assert norms[0] > 0
    for prev, now in zip(norms, norms[1:]):
        assert now <= 1.01 * prev * (1 + 1e-6)
    assert any(now == pytest.approx(1.01 * prev, rel=1e-5) for prev, now in zip(norms, norms[1:]))  # it bound


def test_limiter_function_scales_and_records_the_post_limit_norm():
    s = torch.full((4, 4), 1.0)  # norm 4
    prev = torch.tensor(2.0)
    limit_growth_(s, prev, 1.1)
    assert s.norm().item() == pytest.approx(2.2) and prev.item() == pytest.approx(2.2)
    small = torch.full((4, 4), 0.1)
    limit_growth_(small, prev, 1.1)  # shrinking is never limited
    assert small.norm().item() == pytest.approx(0.4) and prev.item() == pytest.approx(0.4)
    first = torch.ones(2, 2)
    zero = torch.tensor(0.0)
    limit_growth_(first, zero, 1.01)  # nothing stored yet: no limit
    assert zero.item() == pytest.approx(2.0)


def test_projection_changes_only_every_gap_steps():
    w, opt = _matrix_opt(rank=8, update_proj_gap=3)
    ps = []
    for g in _grads(w.shape, 8):
        w.grad = g
        opt.step()
        ps.append(opt.state[w]["p"].clone())
    changed = [i + 1 for i in range(1, 8) if not torch.equal(ps[i], ps[i - 1])]
    assert changed == [4, 7]  # steps 1, 4, 7 refresh (step 1 from zeros)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_full_rank_alpha_one_residual_vanishes(shape):
    g = torch.randn(*shape)
    r = min(shape)
    p = fira_mod.projection(g, r)
    low = fira_mod.project(g, p)
    residual = scaled_residual(g, low, torch.randn_like(low), p, alpha=1.0)
    assert residual.norm() < 1e-5 * g.norm()
    w, opt = _matrix_opt(*shape, rank=64, alpha=1.0)
    w.grad = g
    opt.step()
    assert opt.state[w]["residual_norm"].item() < 1e-5 * g.norm().item()


def _reference_fira(w, grads, *, lr, rank, gap, alpha, beta1, beta2, eps, gamma, wd):
    """Fira for an m ≥ n matrix written straight from the paper/spec, in plain PyTorch."""
    mr = vr = p = None
    prev = None
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            p = torch.linalg.svd(g, full_matrices=False)[2][:rank]
        r = g @ p.T
        mr = (1 - beta1) * r if mr is None else beta1 * mr + (1 - beta1) * r
        vr = (1 - beta2) * r * r if vr is None else beta2 * vr + (1 - beta2) * r * r
        n = mr / (vr.sqrt() + eps)
        phi = n.norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True)
        s = (g - alpha * r @ p) * phi
        if prev is not None and s.norm() > gamma * prev:
            s = s * gamma * prev / s.norm()
        prev = s.norm()
        eta = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        w = w - eta * (alpha * n @ p + s)
        w = w - lr * wd * w
    return w


def test_matches_a_plain_pytorch_reference():
    kw = dict(lr=1e-2, rank=6, update_proj_gap=2, alpha=0.25, betas=(0.8, 0.95), eps=1e-6, limiter=1.01,
              weight_decay=0.1)
    w, opt = _matrix_opt(**kw)
    start = w.detach().clone()
    grads = _grads(w.shape, 6, seed=4, growth=1.2)
    for g in grads:
        w.grad = g
        opt.step()
    ref = _reference_fira(start, grads, lr=1e-2, rank=6, gap=2, alpha=0.25, beta1=0.8, beta2=0.95, eps=1e-6,
                          gamma=1.01, wd=0.1)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-5, atol=1e-6)


def test_without_the_residual_it_is_galore_adamw(monkeypatch):
    """Fira minus its residual term is GaLore's AdamW: compare with the galore-torch package when present."""
    galore = pytest.importorskip("galore_torch")
    monkeypatch.setattr(fira_mod, "scaled_residual", lambda g, low, normed, p, alpha: torch.zeros_like(g))
    w, opt = _matrix_opt(rank=8, update_proj_gap=2, alpha=0.5, lr=1e-2)
    ref = torch.nn.Parameter(w.detach().clone())
    ref_opt = galore.GaLoreAdamW([{"params": [ref], "rank": 8, "update_proj_gap": 2, "scale": 0.5,
                                   "proj_type": "std"}], lr=1e-2, eps=1e-6)
    for g in _grads(w.shape, 5, seed=5):
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_state_size_equals_the_formula():
    for m, n in [(64, 48), (48, 64)]:
        w, opt = _matrix_opt(m, n, rank=8)
        w.grad = torch.randn(m, n)
        opt.step()
        numel = sum(v.numel() for v in opt.state[w].values() if isinstance(v, torch.Tensor))
        assert numel == fira_state_numel(m, n, 8) == 2 * max(m, n) * 8 + min(m, n) * 8 + 1


def test_target_modules_mean_what_they_mean_in_peft(tiny_model):
    def chosen(target):
        ids = {id(p) for g in fira_param_groups(tiny_model, target) if g["fira"] for p in g["params"]}
        return {n.removesuffix(".weight") for n, p in tiny_model.named_parameters() if id(p) in ids}

    linears = {n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert chosen("all-linear") == linears - {"lm_head"}
    assert chosen(["q_proj", "o_proj"]) == {n for n in linears if n.endswith(("q_proj", "o_proj"))}
    with pytest.raises(IncompatibleModelError, match=r"not Linear layers: model\.layers\.0\.self_attn"):
        chosen(["self_attn"])  # a container: PEFT refuses it too, the error names the Linears to list
    with pytest.raises(IncompatibleModelError, match="selects no"):
        chosen(["proj"])  # a fragment is not a '.'-suffix
    assert chosen(r".*\.mlp\.(up|down)_proj") == {n for n in linears if n.endswith(("up_proj", "down_proj"))}
    assert chosen(["model.layers.0.mlp.gate_proj"]) == {"model.layers.0.mlp.gate_proj"}
    with pytest.raises(IncompatibleModelError, match="target_modules"):
        chosen(["no_such_layer"])


def test_a_tiny_mlp_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(128, 16)
    y = x[:, :1] * x[:, 1:2]
    groups = [{"params": [model[0].weight], "fira": True},
              {"params": [model[0].bias, model[2].weight, model[2].bias]}]
    opt = Fira(groups, lr=1e-2, rank=4, update_proj_gap=10)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_trainer_resume_equals_uninterrupted(tiny_path, tiny_dataset, tmp_path):
    recipe = {"optimizer": {"fira": {"rank": 8, "update_proj_gap": 3}}}  # a refresh falls after the resume
    checks.assert_trainer_resume_matches(tiny_path, tiny_dataset, tmp_path, recipe)


def test_bf16_autocast_accumulation_clipping(tiny_path, tiny_dataset, tmp_path):
    checks.assert_trains_in_bf16(tiny_path, tiny_dataset, tmp_path, {"optimizer": {"fira": {}}})


def test_bf16_model_keeps_fp32_state_across_state_dict(tiny_model):
    checks.assert_bf16_model_state_round_trip(
        lambda m: Fira(fira_param_groups(m, "all-linear"), lr=1e-3, rank=8, update_proj_gap=2), tiny_model)


def test_estimate_is_exact(tiny_model, tmp_path):
    from hf_memkit.memory.estimate import estimate_memory

    opt = FiraTechnique().create_optimizer(tiny_model, make_args(tmp_path))
    for p in tiny_model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    est = estimate_memory(tiny_model.config, {"optimizer": {"fira": {}}})
    assert est.categories()["optimizer_states"] == checks.state_bytes(opt)


def test_state_bytes_on_smollm2_shaped_matrices():
    layer = checks.smollm2_layer()
    opt = Fira([{"params": list(layer.parameters()), "fira": True}], rank=64)
    checks.one_random_step(layer, opt)
    measured = checks.state_bytes(opt)
    assert measured == 4 * sum(fira_state_numel(o, i, 64) for o, i in checks.SMOLLM2_LAYER.values())
    ratio = measured / checks.adamw_layer_state_bytes()
    assert ratio <= 0.25, ratio


def test_config_and_technique_wiring(tiny_model, tmp_path):
    cfg = FiraConfig(rank=4, update_proj_gap=7, alpha=0.5, target_modules=["gate_proj", "up_proj", "down_proj"])
    opt = FiraTechnique(cfg).create_optimizer(tiny_model, make_args(tmp_path, learning_rate=2e-3))
    fira_groups = [g for g in opt.param_groups if g["fira"]]
    assert sum(len(g["params"]) for g in fira_groups) == 6  # gate/up/down in 2 layers
    assert all(g["rank"] == 4 and g["update_proj_gap"] == 7 and g["alpha"] == 0.5 and g["lr"] == 2e-3
               for g in opt.param_groups)
    with pytest.raises(ValueError, match="limiter"):
        Fira([torch.nn.Parameter(torch.zeros(2, 2))], limiter=0.5)
