from __future__ import annotations

import torch

from hf_memkit.optim.adamw.config import AdamWConfig
from hf_memkit.optim.adamw.technique import AdamWTechnique
from tests.conftest import make_args


def _steps(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()


def test_matches_plain_torch_adamw_with_trainer_grouping(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(tiny_path)
    ref = AutoModelForCausalLM.from_pretrained(tiny_path)
    args = make_args(tmp_path, learning_rate=3e-3, weight_decay=0.1)
    opt = AdamWTechnique(AdamWConfig(betas=(0.8, 0.99))).create_optimizer(ours, args)
    no_decay = [p for n, p in ref.named_parameters() if "norm" in n or "bias" in n]
    decay = [p for n, p in ref.named_parameters() if not ("norm" in n or "bias" in n)]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=3e-3, betas=(0.8, 0.99))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 500, (2, 16), generator=g) for _ in range(3)]
    _steps(ours, opt, batches)
    _steps(ref, ref_opt, batches)
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=n)


def test_config_values_override_training_args(tiny_model, tmp_path):
    args = make_args(tmp_path, learning_rate=1e-3, weight_decay=0.0)
    opt = AdamWTechnique(AdamWConfig(lr=5e-2, weight_decay=0.3)).create_optimizer(tiny_model, args)
    assert {g["lr"] for g in opt.param_groups} == {5e-2}
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.3]
    opt = AdamWTechnique(AdamWConfig()).create_optimizer(tiny_model, args)
    assert {g["lr"] for g in opt.param_groups} == {1e-3}


def test_estimate_equals_measured_state_bytes(tiny_model, tmp_path):
    from hf_memkit.memory.estimate import estimate_memory
    from hf_memkit.memory.profiler import optimizer_state_bytes

    opt = AdamWTechnique().create_optimizer(tiny_model, make_args(tmp_path))
    for p in tiny_model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    est = estimate_memory(tiny_model.config, {"optimizer": {"adamw": {}}})
    assert est.categories()["optimizer_states"] == optimizer_state_bytes(opt)
