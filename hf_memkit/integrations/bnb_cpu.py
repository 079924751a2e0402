"""bitsandbytes' 4-bit layers on a CPU, kept trainable.

What bitsandbytes 0.50 does (``bnb.nn.Linear4bit.forward``): on a CPU it believes has AVX-512 BF16
(``has_avx512bf16()``), the first call made in eval mode with an input that does not require grad repacks the
layer's weight, in place, into the layout of its CPU inference kernel, and marks the quant state
``packing_format_for_cpu``. Nothing repacks it back when training resumes (only ``state_dict`` and ``.to()`` do).
From then on a training-mode call is computed from the packed data: its output is off by ~0.3% (relative) and its
backward gives **no gradient to the layer's input**, so every LoRA adapter below such a layer learns only through
the residual stream. No error, no warning.

Any one no-grad eval call sets it off: an evaluation before training, the Trainer's ``eval_steps``, or the head
check of ``loss: cce`` (``verify_head``). Measured on SmolLM2-135M with the ``qlora`` recipe (4 × 256 tokens, 40
steps): eval ppl 21.88 with ``loss: cce`` against 12.86 without; one batch's gradient norm 1.05 after a single
4-token eval call against 2.46 without it (the same batch, the same weights).

:func:`keep_4bit_trainable` turns the repacking off on every ``Linear4bit`` of a model (its
``support_avx512bf16_for_cpu`` flag, which the forward checks) and unpacks any layer already packed, with the
inverse bitsandbytes itself uses for ``state_dict`` — an approximate one for double-quantized statistics (weights
within 0.1% of their 4-bit values, measured), so that case is logged as a warning. The cost: evaluation runs through the same dequantize-and-
matmul path as training instead of the CPU inference kernel (which bitsandbytes fetches from the Hub as a
``kernels`` package, and which nothing here may download anyway). Every adapter technique calls it when it wraps a
model (:func:`hf_memkit.integrations.peft_utils.wrap_with_peft`, and ``adapter: qlora`` when it quantizes).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("hf_memkit")


def keep_4bit_trainable(model: Any) -> int:
    """Stop every bitsandbytes ``Linear4bit`` in ``model`` from repacking its weight for CPU inference, and unpack
    the ones already packed. Returns the number of layers it changed. Does nothing (0) where bitsandbytes was
    never imported: then the model holds no such layer."""
    if "bitsandbytes" not in sys.modules:
        return 0
    import bitsandbytes as bnb

    changed = packed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        touched = False
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            touched = True
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            touched = True
            packed += 1
        changed += touched
    if packed:
        logger.warning(
            "hf_memkit: %d bitsandbytes 4-bit layers had been repacked for CPU inference (an eval call before the "
            "recipe was applied) and are unpacked now; bitsandbytes' inverse restores double-quantized statistics "
            "only approximately (measured: weights within 0.1%% of their 4-bit values). For the exact 4-bit "
            "weights, reload the model and apply the recipe before evaluating it", packed)
    if changed:
        logger.debug("hf_memkit: %d bitsandbytes 4-bit layers kept in their trainable layout on CPU", changed)
    return changed
