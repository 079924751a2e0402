"""Checks shared by the COSMOS, Fira and SST tests (imported by tests/optim/fira and tests/optim/sst)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from tests.conftest import make_args

@pytest.fixture(autouse=True)
def one_cpu_thread():
    """These tests multiply small and mid-sized matrices; on a shared CPU, several threads per process spin
    against each other and run 10-40x slower than one. Imported (autouse) by the COSMOS, Fira and SST tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: SmolLM2-135M decoder layer: (out, in) of each Linear (576 hidden, 1536 FFN, 3 kv heads of 64 = 192)
SMOLLM2_LAYER = {
    "q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
    "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536),
}


def smollm2_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({k: nn.Linear(i, o, bias=False) for k, (o, i) in SMOLLM2_LAYER.items()})


def state_bytes(opt) -> int:
    from hf_memkit.memory.profiler import optimizer_state_bytes

    return optimizer_state_bytes(opt)


def one_random_step(module: nn.Module, opt, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    loss = sum((layer(torch.randn(8, layer.in_features, generator=g)) ** 2).mean() for layer in module.values())
    loss.backward()
    opt.step()
    opt.zero_grad()


def adamw_layer_state_bytes() -> int:
    layer = smollm2_layer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    one_random_step(layer, opt)
    return state_bytes(opt) - 4 * len(list(layer.parameters()))  # torch keeps a 4-byte step tensor per param


def _train(tiny_path, dataset, out, recipe, max_steps, resume=None, **kw):
    from transformers import AutoModelForCausalLM

    from hf_memkit import MemkitTrainer

    args = make_args(out, max_steps=max_steps, save_strategy="steps", save_steps=max_steps // 2 or 1,
                     lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0,
                     gradient_accumulation_steps=2, learning_rate=3e-3, **kw)
    trainer = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args,
                            train_dataset=dataset, recipe=recipe)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def assert_trainer_resume_matches(tiny_path, dataset, tmp_path, recipe, n: int = 2) -> None:
    """N steps + checkpoint + resume + N steps == 2N uninterrupted steps (max abs difference <= 1e-6), with a
    cosine schedule, warm-up, clipping and gradient accumulation on."""
    full = _train(tiny_path, dataset, tmp_path, recipe, 2 * n)
    expected = {k: p.detach().clone() for k, p in full.model.named_parameters() if p.requires_grad}
    resumed = _train(tiny_path, dataset, tmp_path, recipe, 2 * n, resume=str(tmp_path / f"checkpoint-{n}"))
    got = dict(resumed.model.named_parameters())
    assert set(expected) <= set(got)
    for k, want in expected.items():
        diff = (got[k].detach() - want).abs().max().item()
        assert diff <= 1e-6, (k, diff)


def assert_trains_in_bf16(tiny_path, dataset, tmp_path, recipe) -> None:
    """bf16 autocast + accumulation + clipping + schedule: finite losses, the weights move, state stays fp32."""
    trainer = _train(tiny_path, dataset, tmp_path, recipe, 2, bf16=True, use_cpu=not torch.cuda.is_available())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(float(v))) for v in losses)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    dtypes = {v.dtype for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
    assert dtypes == {torch.float32}


def assert_bf16_model_state_round_trip(make_optimizer, model: nn.Module, steps: int = 3) -> None:
    """A bf16 model: fp32 state, and a state_dict round trip keeps it fp32 and gives the same next step."""
    import copy

    model = model.to(torch.bfloat16)
    twin = copy.deepcopy(model)
    opt, opt2 = make_optimizer(model), make_optimizer(twin)
    x = torch.randint(0, 500, (2, 16))

    def step(m, o):
        o.zero_grad()
        m(input_ids=x, labels=x).loss.backward()
        o.step()

    for _ in range(steps):
        step(model, opt)
        step(twin, opt2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    dtypes = {v.dtype for s in opt2.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
    assert dtypes == {torch.float32}
    step(model, opt)
    step(twin, opt2)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n
