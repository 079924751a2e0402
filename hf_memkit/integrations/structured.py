"""Structured model surgery for ``comp`` / ``l1_structured``: drop decoder layers and shrink every kept layer's
gated MLP to the same width, and keep the transformers config consistent, so that the result is a standard
config (fewer ``num_hidden_layers``, smaller ``intermediate_size``) that plain ``from_pretrained`` loads.

Model family table: the MLP projections are found by name (``gate_proj``/``up_proj``/``down_proj``: Llama,
Mistral, Qwen2/3, SmolLM, Gemma); other MLP layouts are refused with a typed error.
"""

from __future__ import annotations

from typing import Any

from ..errors import IncompatibleModelError
from .patching import parent_of, swap_module

#: (gate, up, down) names per MLP layout
MLP_LAYOUTS = (("gate_proj", "up_proj", "down_proj"),)


def decoder_layers(model: Any, key: str) -> tuple[str, Any]:
    from .anatomy import anatomy

    try:
        layers = anatomy(model, key=key).layers
    except IncompatibleModelError:
        raise IncompatibleModelError(
            f"{key}: {type(model).__name__} has no list of decoder layers, so there are no layers to drop and no "
            "MLP to shrink; structured pruning needs a decoder-only *ForCausalLM (Llama, Mistral, Qwen, SmolLM)"
        ) from None
    prefix, blocks = layers.path, layers.modules
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) != len(blocks):
        raise IncompatibleModelError(
            f"{key}: the model's config does not describe its {len(blocks)} decoder layers (num_hidden_layers="
            f"{getattr(config, 'num_hidden_layers', None)}); structured pruning edits that config")
    return prefix, blocks


def mlp_of(layer: Any, key: str) -> tuple[Any, str, str, str]:
    mlp = getattr(layer, "mlp", None)
    for names in MLP_LAYOUTS:
        if mlp is not None and all(hasattr(mlp, n) for n in names):
            return (mlp, *names)
    raise IncompatibleModelError(
        f"{key}: decoder layer {type(layer).__name__} has no gated MLP with gate_proj/up_proj/down_proj; "
        "structured neuron pruning supports Llama-style MLPs only")


def drop_layers_(model: Any, drop: list[int], key: str) -> None:
    """Remove the decoder layers ``drop`` (indices), renumber the attention ``layer_idx`` (KV cache slots) and
    shorten per-layer config lists."""
    import torch

    prefix, blocks = decoder_layers(model, key)
    n = len(blocks)
    keep = [i for i in range(n) if i not in set(drop)]
    if not keep:
        raise IncompatibleModelError(f"{key}: dropping {len(drop)} of {n} layers leaves none")
    new = torch.nn.ModuleList([blocks[i] for i in keep])
    parent, attr = parent_of(model, prefix)
    swap_module(parent, attr, new, key)
    for idx, layer in enumerate(new):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = idx
    config = model.config
    for name in ("layer_types",):
        val = getattr(config, name, None)
        if isinstance(val, list) and len(val) == n:
            setattr(config, name, [val[i] for i in keep])
    config.num_hidden_layers = len(keep)


def shrink_mlp_(layer: Any, keep: Any, key: str, down_scale: Any = None) -> None:
    """Keep the MLP neurons ``keep`` (sorted index tensor): rows of gate/up, columns of down (scaled per kept
    neuron by ``down_scale`` when given)."""
    import torch

    mlp, g, u, d = mlp_of(layer, key)
    with torch.no_grad():
        for name in (g, u):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, len(keep), bias=old.bias is not None,
                                  device=old.weight.device, dtype=old.weight.dtype)
            new.weight.copy_(old.weight[keep])
            if old.bias is not None:
                new.bias.copy_(old.bias[keep])
            swap_module(mlp, name, new, key)
        old = getattr(mlp, d)
        new = torch.nn.Linear(len(keep), old.out_features, bias=old.bias is not None,
                              device=old.weight.device, dtype=old.weight.dtype)
        w = old.weight[:, keep].float()
        if down_scale is not None:
            w = w * down_scale.float().to(w.device)[None, :]
        new.weight.copy_(w.to(old.weight.dtype))
        if old.bias is not None:
            new.bias.copy_(old.bias)
        swap_module(mlp, d, new, key)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def set_intermediate_size_(model: Any, size: int) -> None:
    model.config.intermediate_size = size
