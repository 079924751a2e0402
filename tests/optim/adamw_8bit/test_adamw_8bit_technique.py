from __future__ import annotations

import pytest
import torch

from hf_memkit import RecipeError, load_recipe
from hf_memkit.optim.adamw_8bit.config import AdamW8bitConfig
from hf_memkit.optim.adamw_8bit.technique import AdamW8bitTechnique
from hf_memkit.technique import ValidationContext
from tests.conftest import make_args


def _one_step(model, opt, seed=0):
    x = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


def test_state_is_8bit_for_large_tensors_and_fp32_for_small(tiny_model, tmp_path):
    opt = AdamW8bitTechnique(AdamW8bitConfig(min_8bit_size=4096)).create_optimizer(tiny_model, make_args(tmp_path))
    _one_step(tiny_model, opt)
    for p in tiny_model.parameters():
        state = opt.state[p]
        moments = [state[k] for k in ("state1", "state2")]
        expected = torch.uint8 if p.numel() >= 4096 else torch.float32
        assert all(m.dtype == expected for m in moments), (p.shape, [m.dtype for m in moments])


def test_about_a_quarter_of_fp32_adamw_state(tiny_model, tmp_path):
    """The defining property (Dettmers et al. 2022): block-wise 8-bit moments, ~2 bytes/param instead of 8."""
    from hf_memkit.memory.estimate import estimate_memory
    from hf_memkit.memory.profiler import optimizer_state_bytes

    opt = AdamW8bitTechnique(AdamW8bitConfig(min_8bit_size=1)).create_optimizer(tiny_model, make_args(tmp_path))
    _one_step(tiny_model, opt)
    measured = optimizer_state_bytes(opt)
    n = sum(p.numel() for p in tiny_model.parameters())
    assert 2 * n <= measured < 2.2 * n + 64 * 1024
    est = estimate_memory(tiny_model.config, {"optimizer": {"adamw_8bit": {"min_8bit_size": 1}}})
    assert est.categories()["optimizer_states"] == pytest.approx(measured, rel=0.02)


def test_trajectory_tracks_fp32_adamw(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_path)
    b = AutoModelForCausalLM.from_pretrained(tiny_path)
    args = make_args(tmp_path, learning_rate=1e-3, weight_decay=0.0)
    opt_a = AdamW8bitTechnique().create_optimizer(a, args)
    opt_b = torch.optim.AdamW([p for p in b.parameters()], lr=1e-3, weight_decay=0.0)
    start = {n: p.detach().clone() for n, p in a.named_parameters()}
    for s in range(5):
        _one_step(a, opt_a, s)
        _one_step(b, opt_b, s)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        moved = (pb - start[n]).norm()
        assert (pa - pb).norm() <= 0.1 * moved + 1e-6, n


def test_paged_needs_cuda_and_says_so():
    recipe = load_recipe({"optimizer": {"adamw_8bit": {"paged": True}}})
    t = recipe.build()[0]
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        pytest.skip("a GPU is present")
    with pytest.raises(RecipeError, match="paged"):
        t.validate(ValidationContext(recipe))
