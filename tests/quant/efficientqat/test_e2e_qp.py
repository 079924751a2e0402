"""E2E-QP: the quantized Linear's scale gradient, and the technique's patch (only scales train, remove restores)."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.quant.efficientqat.qlinear import QuantLinear
from hf_memkit.compress.grid import QuantSpec, rtn_quantize


def _quant_linear(bias=True):
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    b = torch.nn.Parameter(torch.randn(12), requires_grad=False) if bias else None
    return QuantLinear(rtn_quantize(w, QuantSpec(3, 16)), b, torch.float32)


def test_forward_and_scale_gradient_match_the_naive_formula():
    ql = _quant_linear()
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = ql(x)
    s = ql.weight_scale.detach().clone().requires_grad_(True)
    qz = ql.weight_codes.float() - ql.weight_zero_point.float().repeat_interleave(16, 1)
    x2 = x.detach().clone().requires_grad_(True)
    naive = torch.nn.functional.linear(x2, qz * s.repeat_interleave(16, 1), ql.bias)
    torch.testing.assert_close(y, naive)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (naive * g).sum().backward()
    torch.testing.assert_close(ql.weight_scale.grad, s.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_backward_saves_only_the_input():
    ql = _quant_linear(bias=False)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ql(x)
    own = {t.data_ptr() for t in (ql.weight_codes, ql.weight_zero_point, ql.weight_scale)}
    extra = [t for t in saved if t.data_ptr() not in own]
    assert len(extra) == 1 and extra[0].data_ptr() == x.data_ptr()  # no float copy of the weight is kept


def test_patch_trains_only_scales_and_remove_restores(tiny_model):
    from hf_memkit.quant.efficientqat.technique import E2EQPTechnique
    from hf_memkit.compress.linear import quantized_modules

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    handle = E2EQPTechnique().patch_model(tiny_model)
    model = handle.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("weight_scale") for n in trainable)
    assert len(quantized_modules(model)) == 14
    loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    assert handle.remove() is tiny_model
    after = tiny_model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_e2e_after_a_quantizer_trains_that_quantizers_grid(tiny_model, tmp_path):
    from hf_memkit import load_recipe
    from hf_memkit.integrations.trainer import prepare

    recipe = load_recipe({"compress": [{"rtn": {"bits": 2, "group_size": 32}}, {"e2e_qp": {}}]})
    model, _, runtime = prepare(tiny_model, None, recipe)
    from hf_memkit.compress.linear import quantized_modules

    specs = {qw.spec for _n, m, qw in quantized_modules(model) if isinstance(m, QuantLinear)}
    assert specs == {QuantSpec(2, 32)}
    assert runtime.unpatch() is tiny_model
    assert not quantized_modules(tiny_model)


def test_lorc_and_e2e_qp_do_not_combine():
    from hf_memkit import load_recipe
    from hf_memkit.errors import RecipeError

    with pytest.raises(RecipeError, match="cannot be combined"):
        load_recipe({"compress": [{"gptq": {}}, {"lorc": {}}, {"e2e_qp": {}}]})
