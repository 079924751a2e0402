"""WTA-CRS's estimate, as a difference to the plain saved-activation model (Llama-style names). A sampled layer
saves k·(d_in·dtype + 8) bytes (rows + int64 indices) instead of sharing its N·d_in input: q/k/v and gate/up
share one input in the plain model, so that input goes away only when every layer reading it is sampled.
o_proj's input is SDPA's own saved output (kept anyway), so sampling o_proj adds its k rows."""

from __future__ import annotations

from typing import Any

from ...memory.activations import _needs_input, _trains
from ..saved_layout import dims
from .sampler import sample_size

_GROUPS = {"self_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "mlp": ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj": ("mlp.down_proj",),
           "self_attn.o_proj": ("self_attn.o_proj",)}


def wta_crs_activation_delta(mem: Any, cfg: Any) -> tuple[int, str]:
    config = mem.model.config
    d, T, k = mem.dtype_bytes, mem.batch_size * mem.seq_len, dims(config)
    rows = sample_size(T, cfg.ratio, cfg.min_k)
    width = {"self_attn": k["h"], "mlp": k["h"], "mlp.down_proj": k["i"], "self_attn.o_proj": k["q"]}
    from ...integrations.anatomy import name_matches

    hit = lambda name: name_matches(name, cfg.targets)  # noqa: E731
    delta = 0
    if mem.gradient_checkpointing:
        return 0, "checkpointed layers: sampled rows only exist while a layer is recomputed"
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}."
        for group, members in _GROUPS.items():
            sampled = [m for m in members if hit(pre + m) and _trains(mem, pre + m)]
            if not sampled:
                continue
            delta += len(sampled) * rows * (width[group] * d + 8)
            others = [m for m in members if m not in sampled and _needs_input(mem, pre + m)]
            if group != "self_attn.o_proj" and not others:
                delta -= width[group] * d * T
    # a sampled Linear computing with a weight view (AST, CAST): the kernel keeps the view tensor for backward
    delta += sum(b for m, b in mem.linear_views.items() if hit(m) and _trains(mem, m))
    for module, fan_in, r, dropout in mem.adapter_branches:  # the adapter's Linears under a targeted module train
        if not hit(module):
            continue
        if dropout:  # A's input is dropout's output, a tensor of its own: k rows of it stay
            delta += rows * (fan_in * d + 8) - fan_in * d * T
        delta += rows * (r * d + 8) - r * d * T  # B's input (A's output)
    if hit("lm_head") and _trains(mem, "lm_head"):
        delta += rows * (k["h"] * d + 8) - k["h"] * d * T
    return delta, f"k={rows} of {T} token rows saved by the sampled Linear layers"
