"""What 16-bit weight storage (``precision: {bf16: {}}``) must know about transformers and PEFT internals.

* Which modules hold the weights to store in 16 bits: every module of *exactly* ``nn.Linear`` or ``nn.Embedding``
  type (subclasses such as bitsandbytes' ``Linear4bit``/``Linear8bitLt`` or PEFT's ``lora.Linear`` carry their own
  storage or forward and are left alone; a PEFT LoRA layer's ``base_layer`` is a plain ``nn.Linear`` and is
  converted).
* Which stay fp32: the adapter weights of PEFT tuner layers — the modules under each ``BaseTunerLayer``'s
  ``adapter_layer_names`` and ``other_param_names`` (``lora_A``/``lora_B``/``lora_embedding_*``, and hf_memkit's
  MixLoRA and LoRC, which declare theirs the same way) — found by duck typing, so PEFT is never imported here.
* Embeddings with ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` keep fp32 (their forward does more than a
  lookup).
* Tied weights (SmolLM2's embedding and lm_head share one ``Parameter``) are converted once, in place
  (``param.data``), so the tie and every reference to the parameter (optimizer, PEFT) survive.
* transformers' hub kernels: the recipe runtime switches them off before any patch
  (:mod:`.hub_kernels`); :func:`kernels_off` does the same when the technique is applied by hand.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


def adapter_module_ids(model: Any) -> set[int]:
    """ids of every module inside a PEFT tuner layer's adapter containers (they stay fp32)."""
    out: set[int] = set()
    for m in model.modules():
        names = tuple(getattr(type(m), "adapter_layer_names", ())) + tuple(getattr(type(m), "other_param_names", ()))
        if not names or not hasattr(m, "get_base_layer"):
            continue
        for n in names:
            holder = getattr(m, n, None)
            if isinstance(holder, nn.Module):
                out.update(id(sub) for sub in holder.modules())
    return out


def _skipped(name: str, skip: list[str]) -> bool:
    from .anatomy import name_matches

    return name_matches(name, skip)


def storage_targets(model: Any, skip: list[str]) -> tuple[dict[str, nn.Linear], dict[str, nn.Embedding], list[str]]:
    """(Linear modules, Embedding modules) whose weights go to 16 bits, by qualified name, and a list of
    "name: why" for plain Linear/Embedding modules kept in fp32."""
    adapters = adapter_module_ids(model)
    linears: dict[str, nn.Linear] = {}
    embeddings: dict[str, nn.Embedding] = {}
    kept: list[str] = []
    for name, m in model.named_modules():
        kind = type(m)
        if kind is not nn.Linear and kind is not nn.Embedding:
            continue
        if id(m) in adapters:
            continue  # adapter weights: small, trained in fp32
        if _skipped(name, skip):
            kept.append(f"{name}: skip_modules")
            continue
        w = getattr(m, "weight", None)
        if type(w) is not nn.Parameter or not w.is_floating_point():
            kept.append(f"{name}: weight is a {type(w).__name__} of {getattr(w, 'dtype', None)}")
            continue
        if "forward" in vars(m):
            kept.append(f"{name}: its forward is already replaced by another patch")
            continue
        if kind is nn.Embedding:
            if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
                kept.append(f"{name}: max_norm / scale_grad_by_freq / sparse embedding")
                continue
            embeddings[name] = m
        else:
            linears[name] = m
    return linears, embeddings, kept


def kernels_off(model: Any) -> "Callable[[], None] | None":
    """Hub kernels off before instance forwards are set (a later ``train()`` would re-kernelize and drop them)."""
    from .hub_kernels import disable_hub_kernels

    return disable_hub_kernels(model, "precision.bf16 sets instance forwards on Linear and Embedding modules")
