"""``export: {format: safetensors}``: a plain HF folder that ``from_pretrained`` loads, adapters merged."""

from __future__ import annotations

import copy
import logging
from typing import Any

logger = logging.getLogger("hf_memkit")


def export_safetensors(model: Any, out_dir: str, *, merge_adapters: bool = True) -> str:
    from peft import PeftModel

    target = model
    if isinstance(model, PeftModel):
        if merge_adapters and not _has_quantized_base(model):
            target = copy.deepcopy(model).merge_and_unload()
        else:
            if merge_adapters:
                logger.warning("hf_memkit: the base is 4-bit; exporting the adapter beside it instead of merging")
    target.save_pretrained(out_dir, safe_serialization=True)
    logger.info("hf_memkit: exported %s to %s", type(target).__name__, out_dir)
    return out_dir


def _has_quantized_base(model: Any) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.base_model.modules())
