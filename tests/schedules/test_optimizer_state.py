"""Dropping per-parameter state through optimizer wrappers, for torch and bitsandbytes optimizers."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.errors import IncompatibleModelError
from hf_memkit.schedules.optimizer_state import (
    check_per_parameter_state, drop_state, inner_optimizer, optimized_parameters)


class Wrapper:  # what accelerate's AcceleratedOptimizer looks like from outside
    def __init__(self, optimizer):
        self.optimizer = optimizer


def _optimizers():
    import bitsandbytes as bnb

    return [lambda ps: torch.optim.AdamW(ps, lr=0.1), lambda ps: bnb.optim.AdamW8bit(ps, lr=0.1, min_8bit_size=1)]


@pytest.mark.parametrize("make", _optimizers(), ids=["torch_adamw", "bnb_adamw8bit"])
def test_dropped_state_restarts_fresh(make):
    a, b = torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(300))
    opt = Wrapper(make([a, b]))
    for p in (a, b):
        p.grad = torch.ones_like(p)
    inner_optimizer(opt).step()
    assert inner_optimizer(opt).state[a] and optimized_parameters(opt) == {id(a), id(b)}
    assert drop_state(opt, [a]) == 1 and drop_state(opt, [a]) == 0
    assert a not in inner_optimizer(opt).state and inner_optimizer(opt).state[b]
    a.grad, b.grad = torch.ones_like(a), None
    inner_optimizer(opt).step()  # a re-initialises its state, b (no gradient) is skipped
    assert inner_optimizer(opt).state[a]


def test_an_optimizer_without_a_state_dict_is_rejected():
    class Flat:
        param_groups = []
        state = None

    with pytest.raises(IncompatibleModelError, match="per-parameter state"):
        check_per_parameter_state(Wrapper(Flat()), "schedule.lisa")
