"""The channel-sparse Linear: exact at initialisation, the right gradients, reversible."""

from __future__ import annotations

import torch

from hf_memkit.schedules.sparse_update.linear import SLICE, LinearPatch, select_channels


def _linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(24, 10, bias=bias)


def test_forward_is_bit_exact_and_gradients_are_the_selected_columns():
    lin = _linear()
    ref = _linear()
    x = torch.randn(3, 5, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    for p in lin.parameters():
        p.requires_grad_(False)
    patch = LinearPatch(lin, quantized=False, qas=True)
    idx = select_channels(lin.weight, 6)
    patch.set_channels(idx)
    y = lin(x)
    y_ref = ref(x_ref)
    assert torch.equal(y, y_ref)
    (y ** 2).sum().backward()
    (y_ref ** 2).sum().backward()
    torch.testing.assert_close(getattr(lin, SLICE).grad, ref.weight.grad[:, idx])
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert lin.weight.grad is None


def test_selection_is_by_input_channel_l2_norm():
    w = torch.zeros(4, 6)
    w[:, 1], w[:, 4], w[:, 5] = 3.0, 2.0, 1.0
    assert select_channels(w, 2).tolist() == [1, 4]


def test_remove_without_training_is_exact_and_after_training_folds():
    lin = _linear()
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    patch = LinearPatch(lin, quantized=False, qas=True)
    patch.set_channels(select_channels(lin.weight, 4))
    patch.remove()
    assert set(lin.state_dict()) == set(before) and all(torch.equal(lin.state_dict()[k], before[k]) for k in before)
    assert "forward" not in vars(lin)
    patch = LinearPatch(lin, quantized=False, qas=True)
    idx = select_channels(lin.weight, 4)
    patch.set_channels(idx)
    with torch.no_grad():
        getattr(lin, SLICE).add_(1.0)
    assert set(lin.state_dict()) == set(before)  # saved as a plain Linear, slice folded in
    patch.remove()
    torch.testing.assert_close(lin.weight[:, idx], before["weight"][:, idx] + 1)


def test_loading_a_plain_state_dict_refills_the_slice():
    lin = _linear()
    patch = LinearPatch(lin, quantized=False, qas=True)
    idx = select_channels(lin.weight, 5)
    patch.set_channels(idx)
    other = _linear(seed=1).state_dict()
    lin.load_state_dict(other)
    assert torch.equal(getattr(lin, SLICE), other["weight"][:, idx])
    assert torch.equal(lin(torch.ones(2, 24)), torch.nn.functional.linear(torch.ones(2, 24), other["weight"],
                                                                          other["bias"]))
