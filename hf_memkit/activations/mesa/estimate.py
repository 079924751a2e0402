"""Mesa's estimate: the 8-bit version of :mod:`hf_memkit.activations.saved_layout`, returned as the difference
to the plain model (the estimator adds the plain saved activations after the technique hooks).

Per covered tensor Mesa keeps 1 byte per element plus a (2, G) fp32 scale/shift pair; 1/rms stays fp32; the
normalised tensor of a norm is no longer saved (recomputed from the 8-bit input); q/k/v (and gate/up) share one
8-bit copy of their common input; o_proj quantizes its input (with SDPA that input was shared with SDPA's own
saved output). With eager attention q, k, v and the softmax output (L per head per token) are 8-bit; with SDPA
its saved tensors are unchanged. Under gradient checkpointing only the final norm and head change.
"""

from __future__ import annotations

import math
from typing import Any

from ...memory.activations import _trains
from ..saved_layout import ATTN_IN, MLP_IN, dims, head_tensors, saved_tensors

#: per-element bytes of the plain kinds Mesa replaces: 8-bit copy (1 byte) or nothing
_INT8 = {"norm_input", "linear_input", "mlp_gate", "mlp_up"}
_GONE = {"norm_normalised", "mlp_act"}


def _groups(channels: int, groups: int) -> int:
    return math.gcd(channels, groups) or 1


def _replaced(mem: Any, site: str) -> bool:
    """Every Linear reading the input saved at ``site`` was replaced by another module type (SST, QAT), which
    Mesa's nn.Linear kernel does not reach: that input stays as the replacement saves it."""
    if not mem.replaced_linears:
        return False
    consumers = {"self_attn": ATTN_IN, "mlp": MLP_IN}.get(site.rsplit(".", 1)[-1])
    names = [f"{site.rsplit('.', 1)[0]}.{c}" for c in consumers] if consumers else [site]
    return all(n in mem.replaced_linears for n in names)


def mesa_tensors(mem: Any, config: Any, cfg: Any, items: list, eager: bool) -> int:
    d = mem.dtype_bytes
    k = dims(config)
    cover = set(cfg.cover)
    total = 0
    for s in items:
        covered = ((s.kind == "norm_input" or s.kind == "norm_normalised") and "norm" in cover) or \
                  (s.kind == "linear_input" and "linear" in cover and not _replaced(mem, s.site)) or \
                  (s.kind.startswith("mlp_") and "mlp" in cover)
        if not covered:
            total += s.bytes
            continue
        if s.kind in _GONE:
            continue
        elems = s.bytes // (4 if s.kind == "norm_input" else d)
        channels = k["i"] if s.kind in ("mlp_gate", "mlp_up") or (s.kind == "linear_input" and
                                                                  s.site.endswith("down_proj")) else k["h"]
        total += elems + 8 * _groups(channels, cfg.groups)
    return total


def _attention(mem: Any, config: Any, cfg: Any, layers: int, eager: bool) -> int:
    """Attention bytes Mesa saves per model minus what the SDPA-based layout counts."""
    d, T, k = mem.dtype_bytes, mem.batch_size * mem.seq_len, dims(config)
    sdpa = d * (2 * k["q"] + 2 * k["kv"]) * T + 4 * k["heads"] * T
    # o_proj's input (SDPA's saved output) gets an 8-bit copy of its own, unless o_proj is no nn.Linear any more
    o_covered = "linear" in cfg.cover and not any(m.endswith("self_attn.o_proj") for m in mem.replaced_linears)
    extra_o = (k["q"] * T + 8 * _groups(k["q"], cfg.groups)) if o_covered else 0
    if eager and "attention" in cfg.cover:
        mesa = (k["q"] + 2 * k["kv"]) * T + k["heads"] * mem.seq_len * T + 8 * (2 * k["heads"] + 2 * k["kv_heads"])
        return layers * (mesa + extra_o - sdpa)
    return layers * extra_o


def _adapter_branches(mem: Any, cfg: Any) -> int:
    """LoRA branches (the adapter's own term): A's input, when dropout makes it a tensor of its own, and B's
    input (A's output) are kept in 8 bits by Mesa's Linear kernel; the dropout mask stays."""
    d, T = mem.dtype_bytes, mem.batch_size * mem.seq_len
    delta = 0
    for _module, fan_in, r, dropout in mem.adapter_branches:
        if dropout:
            delta -= (d - 1) * fan_in * T - 8 * _groups(fan_in, cfg.groups)
        delta -= (d - 1) * r * T - 8 * _groups(r, cfg.groups)
    return delta


def mesa_activation_delta(mem: Any, cfg: Any) -> tuple[int, str]:
    config = mem.model.config
    eager = getattr(config, "_attn_implementation", None) in ("eager", "memkit_mesa_eager")
    if mem.gradient_checkpointing:
        items = head_tensors(mem, config)
        return (mesa_tensors(mem, config, cfg, items, eager) - sum(s.bytes for s in items),
                "8-bit final norm / head input (checkpointed layers unchanged)")
    plain = [s for s in saved_tensors(mem, config) if not s.kind.startswith("sdpa_")]
    delta = mesa_tensors(mem, config, cfg, plain, eager) - sum(s.bytes for s in plain)
    delta += _attention(mem, config, cfg, config.num_hidden_layers, eager)
    if "linear" in cfg.cover:
        delta += _adapter_branches(mem, cfg)
        # a Linear computing with a weight view: Mesa's kernel keeps that view tensor for its backward
        delta += sum(b for m, b in mem.linear_views.items() if _trains(mem, m))
    note = "8-bit saved tensors" + (" incl. eager attention" if eager else "; SDPA's saved q/k/v/out stay exact")
    return delta, note
