"""Memory estimate of MixLoRA: the adapter tensors (counted on a meta-device copy) and what the MoE layers and
the attention LoRA branches keep for the backward."""

from __future__ import annotations

import copy
import warnings
from typing import Any


def estimate_mixlora(mem: Any, cfg: Any) -> None:
    from peft import get_peft_model

    from .technique import mixlora_config

    mem.freeze_all()
    meta = copy.deepcopy(mem.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pm = get_peft_model(meta, mixlora_config(cfg.peft_kwargs()))
    from .layers import MixLoraFFN, MixLoraLinear

    d = mem.dtype_bytes
    tokens = mem.batch_size * mem.seq_len
    per_token = 0
    for n, p in pm.named_parameters():
        if p.requires_grad:
            mem.add_param(n, tuple(p.shape), trainable=True, category="adapter_weights")
    drop = cfg.lora_dropout > 0
    for name, m in pm.named_modules():
        if isinstance(m, MixLoraLinear):
            module = name.removeprefix("base_model.model.")
            if drop:
                per_token += 2 * d * m.in_features
            else:
                mem.needs_input.add(module)
            per_token += d * cfg.r
        elif isinstance(m, MixLoraFFN):
            per_token += _ffn_bytes_per_token(m, cfg, d)
    if mem.gradient_checkpointing:
        return
    mem.add("activations", per_token * tokens, "mixlora", "attention LoRA branches, routers, expert deltas")


def _ffn_bytes_per_token(m: Any, cfg: Any, d: int) -> int:
    """Saved for the backward, per token, by one MoE layer (see ffn.mixture_forward): the router input and
    probabilities; and for each of the k routed copies of a token, its expert's inputs (token rows, the
    projections' rows), the LoRA intermediates and the activation pieces."""
    from .ffn import projection_shape

    kind = m.kind
    hidden = m.hidden
    inter = projection_shape(getattr(m.base_layer, kind.outer))[0]
    E, k, r = cfg.num_experts, cfg.top_k, cfg.r
    router = 4 * hidden + 4 * 3 * E  # fp32 router input, logits/probs/softmax
    n_inner = len(kind.inner)
    per_copy = d * hidden * (1 + (2 * n_inner if cfg.lora_dropout > 0 else 0))  # routed token rows (+ dropout)
    per_copy += n_inner * d * (r + inter)  # each inner projection: A output, pre-activation rows
    per_copy += d * inter  # the expert's activation output (the base activation is shared: ffn.mixture_forward)
    per_copy += d * (inter * (3 if cfg.lora_dropout > 0 else 1) + r)  # down-projection delta input (+dropout), A out
    per_copy += d * 2 * (inter + hidden) // 2 + 8  # gate weight products, index rows
    return router + k * per_copy
