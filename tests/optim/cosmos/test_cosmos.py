from __future__ import annotations

import io
import math

import pytest
import torch

from hf_memkit.optim import Cosmos
from hf_memkit.optim.cosmos.config import CosmosConfig
from hf_memkit.optim.cosmos.optimizer import cosmos_param_groups, cosmos_state_numel, newton_schulz5
from hf_memkit.optim.cosmos.technique import CosmosTechnique
from hf_memkit.optim.common.targets import hidden_matrix_names
from tests.conftest import make_args
from tests.optim.cosmos import trainer_checks as checks
from tests.optim.cosmos.trainer_checks import one_cpu_thread  # noqa: F401  (autouse fixture)


def _matrix_opt(m=64, n=48, **kw):
    w = torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(1)))
    kw.setdefault("ns_dtype", "float32")
    return w, Cosmos([{"params": [w], "cosmos": True}], **kw)


def _grads(shape, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


def test_projection_stays_orthonormal_every_step():
    w, opt = _matrix_opt(rank=8)
    for grad in _grads(w.shape, 12):
        w.grad = grad
        opt.step()
        p = opt.state[w]["p"]
        assert p.shape == (48, 8)
        assert torch.linalg.matrix_norm(p.mT @ p - torch.eye(8)) < 1e-4


@pytest.mark.parametrize("rank", [8, 48])  # 48 = min(m, n): the residual vanishes, the guard keeps it finite
def test_step_has_the_documented_norm(rank):
    lr, ratio = 3e-3, 0.2
    w, opt = _matrix_opt(rank=rank, lr=lr, lr_ratio=ratio)
    for grad in _grads(w.shape, 5, seed=2):
        before = w.detach().clone()
        w.grad = grad
        opt.step()
        step = torch.linalg.matrix_norm(w.detach() - before)
        assert step.item() == pytest.approx(lr * ratio * math.sqrt(64 * 48), rel=1e-5)


def test_state_size_equals_the_formula():
    for m, n, rank in [(64, 48, 8), (48, 64, 8), (16, 40, 64)]:
        w, opt = _matrix_opt(m, n, rank=rank)
        w.grad = torch.randn(m, n)
        opt.step()
        numel = sum(v.numel() for v in opt.state[w].values() if isinstance(v, torch.Tensor))
        r = min(rank, m, n)
        assert numel == cosmos_state_numel(m, n, rank) == m * n + m * r + n * r + r * r


def _reference_cosmos(w, grads, *, lr, lr_ratio, beta1, beta2, eps, rank, gamma):
    """The reference's formulation in plain PyTorch: un-normalised momentum M ← β1·M + G with
    bc1 = (1−β1^t)/(1−β1), Nesterov G̃ = (G + β1·M)/(1 + β1·bc1); SVD at step 1, then power step + QR."""
    m, n = w.shape
    mom = torch.zeros(m, n)
    v = torch.zeros(m, rank)
    p = s = None
    for t, g in enumerate(grads, start=1):
        mom = beta1 * mom + g
        if t == 1:
            _, sv, vh = torch.linalg.svd(g, full_matrices=False)
            p = vh[:rank].T
            s = (1 - beta2) * p.T @ g.T @ g @ p
        else:
            p_old = p
            p, _ = torch.linalg.qr(beta2 * p_old @ s + (1 - beta2) * g.T @ (g @ p_old))
            t_rot = p_old.T @ p
            s = beta2 * t_rot.T @ s @ t_rot + (1 - beta2) * (g @ p).T @ (g @ p)
        v = beta2 * v + (1 - beta2) * (g @ p) ** 2
        bc1 = (1 - beta1**t) / (1 - beta1)
        gt = (g + beta1 * mom) / (1 + beta1 * bc1)
        a = gt @ p
        u1 = (a / (torch.sqrt(v / (1 - beta2**t)) + eps)) @ p.T
        r = newton_schulz5(gt - a @ p.T, 5, torch.float32)
        u = u1 + gamma * math.sqrt(m * n) * r / r.norm()
        w = w - lr * lr_ratio * math.sqrt(m * n) * u / u.norm()
    return w


def test_matches_a_plain_pytorch_reference_of_the_paper_update():
    kw = dict(lr=1e-2, lr_ratio=0.5, betas=(0.8, 0.95), eps=1e-8, rank=8, gamma=0.3)
    w, opt = _matrix_opt(**kw)
    start = w.detach().clone()
    grads = _grads(w.shape, 6, seed=3)
    for g in grads:
        w.grad = g
        opt.step()
    ref = _reference_cosmos(start, grads, lr=1e-2, lr_ratio=0.5, beta1=0.8, beta2=0.95, eps=1e-8, rank=8, gamma=0.3)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-4, atol=1e-5)


def test_without_nesterov_the_momentum_is_used():
    """The reference rescales the raw gradient when nesterov=False; here a zero gradient still moves W along
    the bias-corrected momentum."""
    w, opt = _matrix_opt(rank=4, nesterov=False)
    w.grad = torch.randn(64, 48)
    opt.step()
    before = w.detach().clone()
    w.grad = torch.zeros(64, 48)
    opt.step()
    assert torch.linalg.matrix_norm(w.detach() - before) > 0


def test_adamw_branch_matches_torch_adamw_for_any_beta1():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(10))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = Cosmos([{"params": [ours], "cosmos": False}], lr=1e-2, betas=(0.7, 0.99), weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.7, 0.99), weight_decay=0.1, foreach=False)
    for g in _grads((10,), 5):
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_matrices_are_picked_by_role_not_size(tiny_model):
    groups = cosmos_param_groups(tiny_model, 0.1)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    cosmos = {names[id(p)] for g in groups if g["cosmos"] for p in g["params"]}
    adamw = {names[id(p)] for g in groups if not g["cosmos"] for p in g["params"]}
    assert cosmos == {n for n, p in tiny_model.named_parameters() if ".layers." in n and p.dim() == 2}
    # the 512-row embedding and head would pass the reference's size(0) <= 10000 test; they stay on AdamW
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= adamw
    assert all(".weight" in n and "norm" in n for n in adamw - {"model.embed_tokens.weight", "lm_head.weight"})
    big = torch.nn.Sequential(torch.nn.Linear(4, 12000, bias=False))  # a hidden matrix with 12000 rows
    assert any(g["cosmos"] for g in cosmos_param_groups(big))
    from transformers import LlamaForSequenceClassification

    classifier = LlamaForSequenceClassification(tiny_model.config)  # its `score` head is no hidden matrix
    assert "score.weight" not in hidden_matrix_names(classifier)
    assert len(hidden_matrix_names(classifier)) == len(cosmos)


def test_a_tiny_mlp_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(128, 16)
    y = x[:, :1] * x[:, 1:2]
    opt = Cosmos(model, lr=1e-2, lr_ratio=1.0, rank=4, ns_dtype="float32")
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_plain_state_dict_resume_equals_uninterrupted(tiny_path):
    from transformers import AutoModelForCausalLM

    def run(steps, model=None, state=None):
        model = model or AutoModelForCausalLM.from_pretrained(tiny_path)
        opt = Cosmos(model, lr=3e-3, rank=8, weight_decay=0.1)
        if state is not None:
            opt.load_state_dict(state)
        for x in batches[len(batches) - steps:] if state is not None else batches[:steps]:
            opt.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
        return model, opt

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 500, (2, 16), generator=g) for _ in range(6)]
    full, _ = run(6)
    half, opt = run(3)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_path)
    fresh.load_state_dict(saved["model"])
    resumed, _ = run(3, fresh, saved["opt"])
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert (a - b).abs().max() <= 1e-6, n


def test_trainer_resume_equals_uninterrupted(tiny_path, tiny_dataset, tmp_path):
    checks.assert_trainer_resume_matches(tiny_path, tiny_dataset, tmp_path, {"optimizer": {"cosmos": {"rank": 8}}})


def test_bf16_autocast_accumulation_clipping(tiny_path, tiny_dataset, tmp_path):
    checks.assert_trains_in_bf16(tiny_path, tiny_dataset, tmp_path, {"optimizer": {"cosmos": {}}})


def test_bf16_model_keeps_fp32_state_across_state_dict(tiny_model):
    checks.assert_bf16_model_state_round_trip(lambda m: Cosmos(m, lr=1e-3, rank=8), tiny_model)


def test_estimate_is_exact(tiny_model, tmp_path):
    from hf_memkit.memory.estimate import estimate_memory

    opt = CosmosTechnique().create_optimizer(tiny_model, make_args(tmp_path))
    for p in tiny_model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    est = estimate_memory(tiny_model.config, {"optimizer": {"cosmos": {}}})
    assert est.categories()["optimizer_states"] == checks.state_bytes(opt)


def test_state_bytes_on_smollm2_shaped_matrices():
    layer = checks.smollm2_layer()
    opt = Cosmos([{"params": list(layer.parameters()), "cosmos": True}], rank=64)
    checks.one_random_step(layer, opt)
    measured = checks.state_bytes(opt)
    assert measured == 4 * sum(cosmos_state_numel(o, i, 64) for o, i in checks.SMOLLM2_LAYER.values())
    ratio = measured / checks.adamw_layer_state_bytes()
    assert ratio <= 0.65, ratio


def test_config_and_technique_wiring(tiny_model, tmp_path):
    opt = CosmosTechnique(CosmosConfig(lr=5e-2, weight_decay=0.2, rank=4, betas=(0.95, 0.95))).create_optimizer(
        tiny_model, make_args(tmp_path, learning_rate=1e-3))
    assert {g["lr"] for g in opt.param_groups} == {5e-2}
    assert {g["weight_decay"] for g in opt.param_groups if g["cosmos"]} == {0.2}
    assert all(g["rank"] == 4 and g["betas"] == (0.95, 0.95) for g in opt.param_groups)


def test_bad_arguments_are_typed_errors():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="rank"):
        Cosmos([w], rank=0)
    with pytest.raises(ValueError, match="betas"):
        Cosmos([w], betas=(1.0, 0.9))
    from hf_memkit import RecipeError, load_recipe

    with pytest.raises(RecipeError):
        load_recipe({"optimizer": {"cosmos": {"rank": 0}}})


def test_exports_load_lazily_and_import_hf_memkit_stays_torch_free():
    import subprocess
    import sys

    code = ("import sys, hf_memkit, hf_memkit.optim; from hf_memkit import registry; registry.entries(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from hf_memkit.optim import Cosmos, Fira, SST; print(Cosmos.__name__, Fira.__name__, SST.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Cosmos", "Fira", "SST"]
