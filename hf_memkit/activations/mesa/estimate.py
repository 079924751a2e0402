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

from ..saved_layout import dims, head_tensors, saved_tensors

#: per-element bytes of the plain kinds Mesa replaces: 8-bit copy (1 byte) or nothing
_INT8 = {"norm_input", "linear_input", "mlp_gate", "mlp_up"}
_GONE = {"norm_normalised", "mlp_act"}


def _groups(channels: int, groups: int) -> int:
    return math.gcd(channels, groups) or 1


def mesa_tensors(mem: Any, config: Any, cfg: Any, items: list, eager: bool) -> int:
    d = mem.dtype_bytes
    k = dims(config)
    cover = set(cfg.cover)
    total = 0
    for s in items:
        covered = ((s.kind == "norm_input" or s.kind == "norm_normalised") and "norm" in cover) or \
                  (s.kind == "linear_input" and "linear" in cover) or \
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
    extra_o = (k["q"] * T + 8 * _groups(k["q"], cfg.groups)) if "linear" in cfg.cover else 0  # o_proj's input
    if eager and "attention" in cfg.cover:
        mesa = (k["q"] + 2 * k["kv"]) * T + k["heads"] * mem.seq_len * T + 8 * (2 * k["heads"] + 2 * k["kv_heads"])
        return layers * (mesa + extra_o - sdpa)
    return layers * extra_o


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
    note = "8-bit saved tensors" + (" incl. eager attention" if eager else "; SDPA's saved q/k/v/out stay exact")
    return delta, note
