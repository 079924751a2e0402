"""Export a trained LoRC adapter the way the quantization issue exports LoRC: a compressed-tensors
``pack-quantized`` checkpoint of the quantized base plus the branch as a standard PEFT LoRA adapter at scaling 1
(``lorc_adapter/``), loadable without hf_memkit."""

from __future__ import annotations

import copy
from typing import Any


def to_quantized_model(peft_model: Any) -> Any:
    """A copy of the base model whose targeted Linears are quantized the way :mod:`hf_memkit.compress.linear`
    describes (dequantized weight + codes, LoRC factors with the scaling folded in)."""
    from ...compress.linear import set_lorc_, set_quantized_
    from .layers import LorcLinear

    work = copy.deepcopy(peft_model)
    layers = {n: m for n, m in work.base_model.model.named_modules() if isinstance(m, LorcLinear)}
    plan = []
    for n, m in layers.items():
        name = next(iter(m.active_adapters))
        A, B = m.compensation(name)
        plan.append((n, m.quantized(), A.clone(), B.clone()))
    base = work.unload()
    for n, qw, A, B in plan:
        linear = base.get_submodule(n)
        set_quantized_(linear, qw)
        set_lorc_(linear, A, B, {"rank": int(A.shape[1]), "factor_bits": None})
    return base


def export_lorc(model: Any, out_dir: str, *, tokenizer: Any = None, model_card: bool = False) -> str:
    from ...export.checkpoint import _MARK, export_compressed_tensors

    out = export_compressed_tensors(to_quantized_model(model), out_dir, tokenizer=tokenizer, model_card=model_card)
    import os

    setattr(model, _MARK, (os.path.abspath(out_dir), "compressed-tensors"))
    return out
