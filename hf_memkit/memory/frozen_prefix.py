"""What autograd saves when the bottom of the network needs no gradient — an estimate correction.

:mod:`hf_memkit.memory.activations` assumes every layer's input requires grad (true whenever the embeddings
train, or under gradient checkpointing, where transformers makes the embedding output require grad). When the
embeddings are frozen, a layer whose input needs no gradient and whose parameters are all frozen is run
without building any graph: it saves *nothing*. In the lowest layer that trains something, only the ops after
the first trainable one save their inputs. Measured with :class:`~hf_memkit.memory.profiler.SavedTensorMeter`
on a 6-layer Llama (4×32 tokens, h=64, fp32) with only ``layers.4.mlp.down_proj`` trainable: 467 kB saved,
against 2.2 MB when the embeddings train.

:func:`frozen_prefix_correction` walks the layers with the same per-op table as the estimator, tracking
whether the residual stream requires grad, and returns how many bytes the estimator counts too many; the
techniques that freeze the bottom of the network (``schedule: lisa``, ``sparse_update``) add it as a negative
``activations`` term from their ``estimate`` hooks.
"""

from __future__ import annotations

from typing import Any

LLAMA_LIKE = {"llama", "mistral", "qwen2"}
_ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


def _weight_trains(mem: Any, module: str) -> bool:
    p = mem.param(module + ".weight")
    return bool(p and p.trainable)


def _any_param_trains(mem: Any, module: str, side: set[str]) -> bool:
    """The module's output depends on a trainable tensor: its weight, its bias, or a side tensor a technique
    attached to it (``side``: module names)."""
    if module in side:
        return True
    return any(bool(p and p.trainable) for p in (mem.param(module + ".weight"), mem.param(module + ".bias")))


def _needs_input(mem: Any, module: str) -> bool:
    return _weight_trains(mem, module) or module in mem.needs_input


def layer_saved_per_token(mem: Any, config: Any, layer: int, input_grad: bool, side: set[str] = frozenset(),
                          prefix: str = "model.layers") -> tuple[int, bool]:
    """Bytes per token layer ``layer`` saves when its input does (``input_grad``) or does not require grad, and
    whether its output requires grad. Same table as :func:`hf_memkit.memory.activations.layer_bytes_per_token`
    (which is the ``input_grad=True`` case)."""
    d = mem.dtype_bytes
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = config.intermediate_size
    pre = f"{prefix}.{layer}."
    total = 0
    # attention half: norm -> q/k/v -> SDPA -> o_proj -> residual
    n1 = pre + "input_layernorm"
    total += (4 * h + 4 if input_grad else 0) + (d * h if _weight_trains(mem, n1) else 0)
    g = input_grad or _any_param_trains(mem, n1, side)
    total += d * h if any(_needs_input(mem, pre + m) for m in _ATTN_IN) else 0
    g_attn = g or any(_any_param_trains(mem, pre + m, side) for m in _ATTN_IN)
    total += d * (2 * q + 2 * kv) + 4 * heads if g_attn else 0
    if not g_attn and _needs_input(mem, pre + "self_attn.o_proj"):
        total += d * q  # o_proj's input is otherwise shared with what SDPA saves
    residual = input_grad or g_attn or _any_param_trains(mem, pre + "self_attn.o_proj", side)
    # MLP half: norm -> gate/up -> SwiGLU -> down -> residual
    n2 = pre + "post_attention_layernorm"
    total += (4 * h + 4 if residual else 0) + (d * h if _weight_trains(mem, n2) else 0)
    g = residual or _any_param_trains(mem, n2, side)
    total += d * h if any(_needs_input(mem, pre + m) for m in _MLP_IN) else 0
    g_mlp = g or any(_any_param_trains(mem, pre + m, side) for m in _MLP_IN)
    total += 3 * d * inter if g_mlp else 0
    total += d * inter if _needs_input(mem, pre + "mlp.down_proj") else 0
    out = residual or g_mlp or _any_param_trains(mem, pre + "mlp.down_proj", side)
    return total, out


def frozen_prefix_correction(mem: Any, config: Any, side: set[str] = frozenset(), *,
                             prefix: str = "model.layers", embeddings_grad: bool | None = None) -> int:
    """Bytes (>= 0) the estimator's ``activations`` over-count because the bottom of the network needs no
    gradient. 0 when the embeddings train, under gradient checkpointing, or for non-Llama-style models (whose
    activation estimate is an approximation anyway). ``embeddings_grad=False``: the embedding output is detached
    (a tied matrix that trains through the head only), whatever the embedding weight's flag says."""
    from .activations import layer_bytes_per_token

    if mem.gradient_checkpointing or getattr(config, "model_type", "") not in LLAMA_LIKE:
        return 0
    embed = mem.param("model.embed_tokens.weight")
    grad = bool(embed and embed.trainable) or "model.embed_tokens" in side
    if embeddings_grad is not None:
        grad = embeddings_grad
    if grad:
        return 0
    tokens = mem.batch_size * mem.seq_len
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    over = 0
    attention_in_graph = False
    for i in range(config.num_hidden_layers):
        if grad:
            attention_in_graph = True
            break
        saved, grad = layer_saved_per_token(mem, config, i, False, side, prefix)
        over += (layer_bytes_per_token(mem, config, i) - saved) * tokens
        pre = f"{prefix}.{i}."
        attention_in_graph |= grad and (_any_param_trains(mem, pre + "input_layernorm", side) or any(
            _any_param_trains(mem, pre + m, side) for m in _ATTN_IN))
    if not grad:  # nothing in the layers trains: the final norm's input needs no grad either
        over += (4 * h + 4) * tokens
    if not attention_in_graph:  # no attention op saved RoPE's cos/sin
        over += 2 * mem.seq_len * head_dim * 4
    return over
