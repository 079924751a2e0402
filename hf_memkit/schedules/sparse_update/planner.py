"""The budget planner: bytes per choice (the cost model) and a depth-aware greedy allocation by gain per byte.

Costs count what the update adds to training memory: the slice copy, its gradient and optimizer state
(``optimizer_bytes`` per element), the selected input channels autograd saves and the index; for the norms and
biases of a layer, their gradient and optimizer state and the normalised input a trainable norm saves. On top
of these additive terms comes the one the paper's memory model does not need on a CNN but that dominates a
transformer whose embeddings are frozen: every layer above the lowest trainable one saves its attention and
MLP internals for backward. The planner therefore tries each candidate "lowest layer" L, charges that depth
up front, allocates the rest of the budget greedily among the choices in layers >= L, and keeps the best L.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Option:
    setting: Any  # a ratio (weights) or a number of layers (biases)
    value: float
    cost: int


@dataclass
class Item:
    name: str
    options: list[Option] = field(default_factory=list)  # options[0] is "nothing" (value 0, cost 0)


@dataclass
class CostModel:
    slice_bytes: int  # one element of a trainable slice (and of its gradient)
    optimizer_bytes: float  # optimizer state per trainable element
    act_bytes: int  # one element in the model dtype (activations, norm gradients)
    tokens: int  # tokens per micro-batch

    def weight(self, out_features: int, k: int) -> int:
        return int(k * out_features * (2 * self.slice_bytes + self.optimizer_bytes)
                   + self.tokens * k * self.act_bytes + 8 * k)

    def params(self, numel: int) -> int:
        return int(numel * (self.act_bytes + self.optimizer_bytes))

    def norm_input(self, hidden: int) -> int:
        return self.tokens * hidden * self.act_bytes


@dataclass
class WeightCandidate:
    name: str
    layer: int
    out_features: int
    in_features: int
    #: ratio -> gain of updating that many channels (None: gain = cost, for the data-free estimate)
    gains: dict[float, float] | None = None


@dataclass
class BiasCandidate:
    name: str
    layer: int  # the final norm counts as the last layer
    numel: int
    is_norm: bool
    gain: float | None = None


def frozen_layer_bytes_per_token(config: Any, d: int) -> int:
    """What a Llama-style layer with frozen weights saves per token when its input requires grad (norm inputs,
    SDPA, SwiGLU); 0 when the config does not describe such a layer."""
    try:
        h, heads, inter = config.hidden_size, config.num_attention_heads, config.intermediate_size
    except AttributeError:
        return 0
    head_dim = getattr(config, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return 2 * (4 * h + 4) + d * (2 * q + 2 * kv) + 4 * heads + 3 * d * inter


def greedy_allocate(items: list[Item], budget: int) -> dict[str, int]:
    """Index of the chosen option per item: start from nothing, repeatedly take the upgrade (to any better
    option of one item) with the largest value gained per byte that still fits, until none fits. Ties keep
    the earlier item (callers list the preferred ones first)."""
    choice = {it.name: 0 for it in items}
    spent = 0
    while True:
        best = None
        for it in items:
            cur = it.options[choice[it.name]]
            for j in range(choice[it.name] + 1, len(it.options)):
                o = it.options[j]
                dv, dc = o.value - cur.value, o.cost - cur.cost
                if dv <= 0 or spent + dc > budget:
                    continue
                score = dv / max(dc, 1)
                if best is None or score > best[0]:
                    best = (score, it.name, j, dc)
        if best is None:
            return choice
        _, name, j, dc = best
        choice[name] = j
        spent += dc


@dataclass
class BudgetPlan:
    bias_layers: int
    ratios: dict[str, float]
    value: float
    cost: int
    #: bytes of the cheapest plan that trains anything (what the budget must at least allow)
    cheapest: int = 0


def plan_budget(weights: list[WeightCandidate], biases: list[BiasCandidate], n_layers: int, depth: int,
                ratios: list[float], cost: CostModel, budget: int, frozen_layer_per_token: int,
                hidden: int) -> BudgetPlan:
    """The best plan over every candidate lowest layer (see the module docstring)."""
    ratios = sorted(set(ratios) - {0.0})
    best = BudgetPlan(0, {}, 0.0, 0)
    cheapest = None
    for lowest in range(n_layers - 1, n_layers - depth - 1, -1):
        base = cost.tokens * (frozen_layer_per_token * (n_layers - lowest) + 4 * hidden + 4)
        bias = Item("bias", [Option(0, 0.0, 0)])
        value = spent = 0.0
        for k in range(1, n_layers - lowest + 1):
            layer = n_layers - k
            for b in biases:
                if b.layer != layer:
                    continue
                c = cost.params(b.numel) + (cost.norm_input(b.numel) if b.is_norm else 0)
                spent += c
                value += b.gain if b.gain is not None else c
            bias.options.append(Option(k, value, int(spent)))
        items = [bias]
        for w in sorted((w for w in weights if w.layer >= lowest), key=lambda w: -w.layer):
            item = Item(w.name, [Option(0.0, 0.0, 0)])
            for r in ratios:
                k = int(r * w.in_features)
                if k == 0:
                    continue
                c = cost.weight(w.out_features, k)
                item.options.append(Option(r, w.gains[r] if w.gains is not None else float(c), c))
            items.append(item)
        first = [o.cost for it in items for o in it.options[1:2]]
        if first and (cheapest is None or base + min(first) < cheapest):
            cheapest = base + min(first)
        if base > budget:
            break  # deeper only costs more
        choice = greedy_allocate(items, budget - base)
        total = sum(it.options[choice[it.name]].value for it in items)
        spent_total = base + sum(it.options[choice[it.name]].cost for it in items)
        if total > best.value:
            best = BudgetPlan(bias.options[choice["bias"]].setting,
                              {it.name: it.options[choice[it.name]].setting for it in items[1:]
                               if choice[it.name] > 0}, total, int(spent_total))
    best.cheapest = cheapest or 0
    return best
