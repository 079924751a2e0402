"""The saved-activation model of :mod:`hf_memkit.memory.activations`, tensor by tensor: the activation techniques
need to know not only how many bytes a Llama-style layer saves but which tensors (offload keeps the small ones,
Mesa and WTA-CRS replace some). ``saved_tensors(mem, config)`` lists ``(site, kind, bytes)`` for the whole model
without gradient checkpointing; summed, it equals what ``add_activation_terms`` adds (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..memory.activations import _needs_input, _trains

ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


@dataclass(frozen=True)
class Saved:
    site: str      # module (or group) that saves it
    kind: str      # norm_input, norm_rstd, norm_normalised, linear_input, sdpa_*, mlp_gate/act/up, head_*
    bytes: int
    token_rows: bool = True  # one row per token (offload's token-wise split applies)


def dims(config: Any) -> dict[str, int]:
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {"h": h, "heads": heads, "head_dim": head_dim, "q": heads * head_dim, "kv": kv_heads * head_dim,
            "kv_heads": kv_heads, "i": config.intermediate_size, "layers": config.num_hidden_layers}


def layer_tensors(mem: Any, config: Any, layer: int, prefix: str = "model.layers") -> list[Saved]:
    d, T, k = mem.dtype_bytes, mem.batch_size * mem.seq_len, dims(config)
    h, inter = k["h"], k["i"]
    pre = f"{prefix}.{layer}."
    out: list[Saved] = []
    for norm, consumers in (("input_layernorm", ATTN_IN), ("post_attention_layernorm", MLP_IN)):
        out += [Saved(pre + norm, "norm_input", 4 * h * T), Saved(pre + norm, "norm_rstd", 4 * T)]
        if _trains(mem, pre + norm):
            out.append(Saved(pre + norm, "norm_normalised", d * h * T))
        if any(_needs_input(mem, pre + m) for m in consumers):
            out.append(Saved(pre + ("self_attn" if norm == "input_layernorm" else "mlp"), "linear_input",
                             d * h * T))
        if norm == "input_layernorm":
            out += [Saved(pre + "self_attn", "sdpa_q", d * k["q"] * T),
                    Saved(pre + "self_attn", "sdpa_k", d * k["kv"] * T),
                    Saved(pre + "self_attn", "sdpa_v", d * k["kv"] * T),
                    Saved(pre + "self_attn", "sdpa_out", d * k["q"] * T),
                    Saved(pre + "self_attn", "sdpa_lse", 4 * k["heads"] * T)]
    out += [Saved(pre + "mlp", "mlp_gate", d * inter * T), Saved(pre + "mlp", "mlp_act", d * inter * T),
            Saved(pre + "mlp", "mlp_up", d * inter * T)]
    if _needs_input(mem, pre + "mlp.down_proj"):
        out.append(Saved(pre + "mlp.down_proj", "linear_input", d * inter * T))
    return out


def head_tensors(mem: Any, config: Any) -> list[Saved]:
    d, T, k = mem.dtype_bytes, mem.batch_size * mem.seq_len, dims(config)
    h = k["h"]
    out = [Saved("model.norm", "norm_input", 4 * h * T), Saved("model.norm", "norm_rstd", 4 * T)]
    if _trains(mem, "model.norm"):
        out.append(Saved("model.norm", "norm_normalised", d * h * T))
    if _trains(mem, "lm_head") or "lm_head" in mem.needs_input:
        out.append(Saved("lm_head", "linear_input", d * h * T))
    if _trains(mem, "model.embed_tokens"):
        out.append(Saved("model.embed_tokens", "token_ids", 8 * T))
    out.append(Saved("loss", "labels", 8 * T))
    rope = mem.seq_len * k["head_dim"] * 4
    out += [Saved("rope", "rope_cos", rope, False), Saved("rope", "rope_sin", rope, False)]
    return out


def saved_tensors(mem: Any, config: Any) -> list[Saved]:
    out: list[Saved] = []
    for i in range(config.num_hidden_layers):
        out += layer_tensors(mem, config, i)
    return out + head_tensors(mem, config)
