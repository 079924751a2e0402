"""LoRC factors as a PEFT LoRA adapter beside the quantized checkpoint.

``y = Ŵx + A(Bx)`` is exactly a LoRA layer with ``lora_A = B`` (``[r, in]``), ``lora_B = A`` (``[out, r]``),
``lora_alpha = r`` (scaling 1), no dropout, no bias: ``PeftModel.from_pretrained(base, folder)`` restores the
compensated model from the plain quantized one. Rounded (``factor_bits``) factors are stored as their float
values: PEFT has no integer LoRA storage, so the adapter reproduces the accuracy, not the byte saving.
"""

from __future__ import annotations

import os
from typing import Any

ADAPTER_DIR = "lorc_adapter"


def write_lorc_adapter(model: Any, out_dir: str, *, base_model: str | None = None) -> dict[str, Any] | None:
    """Write the LoRC branches of ``model`` as a PEFT LoRA adapter into ``out_dir``; None when there are none."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from ..compress.linear import lorc_factors

    found = []
    for name, m in model.named_modules():
        f = lorc_factors(m)
        if f is not None:
            found.append((name, *f))
    if not found:
        return None
    ranks = {name: int(A.shape[1]) for name, A, _B, _meta in found}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=r, lora_dropout=0.0, bias="none",
        target_modules=sorted(ranks), init_lora_weights=True,
        rank_pattern={f"^{n.replace('.', '[.]')}$": k for n, k in ranks.items() if k != r},
        alpha_pattern={f"^{n.replace('.', '[.]')}$": k for n, k in ranks.items() if k != r},
        base_model_name_or_path=base_model,
    )
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = {}
    for name, A, B, _meta in found:
        tensors[f"base_model.model.{name}.lora_A.weight"] = B.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = A.detach().cpu().contiguous()
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    factor_bits = {meta.get("factor_bits") for *_rest, meta in found}
    return {"layers": len(found), "rank": r, "factor_bits": factor_bits.pop() if len(factor_bits) == 1 else None,
            "parameters": sum(A.numel() + B.numel() for _n, A, B, _m in found)}
