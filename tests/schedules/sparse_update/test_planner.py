"""The greedy allocation and the depth-aware budget plan."""

from __future__ import annotations

from hf_memkit.schedules.sparse_update.planner import (
    BiasCandidate, CostModel, Item, Option, WeightCandidate, greedy_allocate, plan_budget)


def test_greedy_takes_the_best_gain_per_byte_that_fits():
    items = [Item("a", [Option(0, 0, 0), Option(1, 10, 10), Option(2, 12, 20)]),
             Item("b", [Option(0, 0, 0), Option(1, 8, 4)])]
    assert greedy_allocate(items, 14) == {"a": 1, "b": 1}
    assert greedy_allocate(items, 9) == {"a": 0, "b": 1}
    assert greedy_allocate(items, 3) == {"a": 0, "b": 0}


def test_plan_prefers_top_layers_and_respects_the_budget():
    cost = CostModel(slice_bytes=4, optimizer_bytes=8, act_bytes=4, tokens=10)
    weights = [WeightCandidate(f"l{i}.w", i, 8, 16, {0.25: 1.0 + i, 0.5: 1.5 + i}) for i in range(4)]
    biases = [BiasCandidate(f"l{i}.norm", i, 16, True, 0.1) for i in range(4)]
    plan = plan_budget(weights, biases, 4, 4, [0.0, 0.25, 0.5], cost, budget=3000, frozen_layer_per_token=50,
                       hidden=16)
    assert plan.cost <= 3000 and plan.value > 0
    assert "l3.w" in plan.ratios  # the last layer: no frozen layers to pay for
    bigger = plan_budget(weights, biases, 4, 4, [0.0, 0.25, 0.5], cost, budget=30000, frozen_layer_per_token=50,
                         hidden=16)
    assert bigger.value > plan.value and bigger.cost <= 30000
    none = plan_budget(weights, biases, 4, 4, [0.0, 0.25], cost, budget=10, frozen_layer_per_token=50, hidden=16)
    assert not none.ratios and none.bias_layers == 0 and none.cheapest > 10
