"""Swapping a model's attention function, scoped to one model instance and reversible.

transformers 5 dispatches attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (the
"eager" name falls back to each modeling file's ``eager_attention_forward``) and builds the mask through
``ALL_MASK_ATTENTION_FUNCTIONS`` under the same name. :func:`swap_eager_attention` registers a function under a
hf_memkit name in both tables (the mask is the eager one: additive float), points the model's config(s) at it,
and returns an undo that restores the previous ``_attn_implementation``. Registering is global but additive: a
name nobody else uses, and models that are not patched never look it up.

The function receives ``(module, query, key, value, attention_mask, scaling, dropout, **kwargs)`` with
``query`` ``[B, H, L, D]`` and ``key``/``value`` ``[B, H_kv, S, D]`` and returns ``(attn_output [B, L, H, D],
attn_weights or None)`` — the contract of ``eager_attention_forward``.
"""

from __future__ import annotations

from typing import Any, Callable


def attention_implementation(model: Any) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None)


def register_attention(name: str, fn: Callable) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, fn)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, eager_mask)


def swap_eager_attention(model: Any, name: str, fn: Callable) -> Callable[[], None]:
    """Point every config in ``model`` that uses eager attention at ``fn`` (registered as ``name``)."""
    register_attention(name, fn)
    configs = []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and all(c is not cfg for c, _ in configs) and \
                getattr(cfg, "_attn_implementation", None) == "eager":
            configs.append((cfg, cfg._attn_implementation))
    for cfg, _ in configs:
        cfg._attn_implementation = name

    def undo() -> None:
        for cfg, before in configs:
            cfg._attn_implementation = before

    return undo


def eager_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float,
                    dropout: float = 0.0, **kwargs: Any):
    """The plain eager path (as in transformers' modeling files), used where the 8-bit one does not apply."""
    import torch

    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        b, h, s, d = key.shape
        key = key[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
        value = value[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()
    return out, w
