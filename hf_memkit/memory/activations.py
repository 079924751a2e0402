"""Saved-activation model of a decoder stack: which tensors autograd keeps from forward to backward.

What autograd saves depends on what trains. A Linear saves its input only when its weight needs a gradient
(the input gradient needs just the weight, a parameter); a norm saves its normalised input for the weight's
gradient only when that weight trains. So the estimate walks the layers with the estimate's ``trainable``
flags (after the adapter hooks ran) and counts, per token, in bytes (``d`` = model dtype, RMSNorm computes in
fp32):

========================  ==========================================  =================================
tensor                     size                                        saved when
========================  ==========================================  =================================
norm input + 1/rms         4·h + 4                                     always (two norms per layer)
normalised (pre-weight)    d·h                                         norm weight trains
q/k/v input                d·h                                         q, k or v needs its input
SDPA q, k, v, out, lse     d·(2·q + 2·kv) + 4·heads                    always
o_proj input               (shares the SDPA output's storage)          -
gate/up input              d·h                                         gate or up needs its input
SwiGLU gate, act, up       3·d·i                                       always
down_proj input            d·i                                         down needs its input
final norm, head input     4·h + 4 (+ d·h, + d·h)                      as above
token ids, labels          8 + 8                                       ids when the embedding trains
RoPE cos, sin              2·s·head_dim·4 per sequence (batch 1)       always, shared by all layers
========================  ==========================================  =================================

"needs its input" = its weight trains, or a technique registered it in ``mem.needs_input`` (LoRA with no
dropout feeds the base layer's input to ``lora_A``). Under gradient checkpointing (non-reentrant, as
transformers 5 uses) a layer keeps only its input (``d·h``); its internals are recomputed in backward, which
the separate ``activations_recompute`` term (one layer's set, transient) accounts for.

Exact for Llama-style blocks (llama, mistral, qwen2, smollm) with SDPA attention, checked against
:class:`~hf_memkit.memory.profiler.SavedTensorMeter` by the tests; other families get the same formula as an
approximation and a note saying so.
"""

from __future__ import annotations

from typing import Any

LLAMA_LIKE = {"llama", "mistral", "qwen2"}

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


def _trains(mem: Any, name: str) -> bool:
    p = mem.param(name + ".weight")
    return bool(p and p.trainable)


def _needs_input(mem: Any, module: str) -> bool:
    return _trains(mem, module) or module in mem.needs_input


def layer_bytes_per_token(mem: Any, config: Any, layer: int) -> int:
    d = mem.dtype_bytes
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = config.intermediate_size
    pre = f"model.layers.{layer}."
    total = 0
    for norm in ("input_layernorm", "post_attention_layernorm"):
        total += 4 * h + 4 + (d * h if _trains(mem, pre + norm) else 0)
    total += d * h if any(_needs_input(mem, pre + m) for m in _ATTN) else 0
    total += d * (2 * q + 2 * kv) + 4 * heads
    total += d * h if any(_needs_input(mem, pre + m) for m in _MLP_IN) else 0
    total += 3 * d * inter
    total += d * inter if _needs_input(mem, pre + "mlp.down_proj") else 0
    return total


def add_activation_terms(mem: Any, config: Any) -> None:
    d = mem.dtype_bytes
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    n_layers = config.num_hidden_layers
    tokens = mem.batch_size * mem.seq_len
    note = "" if getattr(config, "model_type", "") in LLAMA_LIKE else (
        f"approximate: model_type {getattr(config, 'model_type', '?')!r} is estimated as a Llama-style block")

    per_layer = [layer_bytes_per_token(mem, config, i) * tokens for i in range(n_layers)]
    if mem.gradient_checkpointing:
        mem.add("activations", n_layers * d * h * tokens, "model", "checkpointed layer inputs " + note)
        mem.add("activations_recompute", max(per_layer), "model", "one layer recomputed in backward (transient)")
    else:
        for i, b in enumerate(per_layer):
            mem.add("activations", b, f"model.layers.{i}", note)
    head = 4 * h + 4 + (d * h if _trains(mem, "model.norm") else 0)
    head += d * h if (_trains(mem, "lm_head") or "lm_head" in mem.needs_input) else 0
    head += 8 + (8 if _trains(mem, "model.embed_tokens") else 0)
    mem.add("activations", head * tokens, "model", "final norm, head input, token ids, labels")
    mem.add("activations", 2 * mem.seq_len * head_dim * 4, "model", "RoPE cos/sin (shared)")
