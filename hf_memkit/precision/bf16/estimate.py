"""Memory terms of 16-bit weight storage.

* ``weights``: each converted Linear/Embedding weight at 2 bytes per element (tied weights once; weights another
  technique already stores narrower — QLoRA's 4-bit base — are left as they are).
* ``gradients``: a trained 16-bit weight has a 16-bit gradient; the estimator later adds every trainable
  parameter at the model dtype, so this adds the (negative) difference.
* ``optimizer_states``: Kahan compensation buffers, 2 bytes per trained 16-bit element (``update: kahan``). The
  inner optimizer's own state is unchanged: it keeps what it keeps for an fp32 parameter.
* ``precision_buffers`` (transient, estimate-only): the optimizer step's fp32 copy of the largest trained 16-bit
  weight and of its gradient, plus the stochastic-rounding scratch; or, when larger, the Linear forward/backward's
  fp32 weight block and its fp32 gradient block.
"""

from __future__ import annotations

from typing import Any

from ...ops.stochastic_round.write import CHUNK
from .functions import UPCAST_BLOCK_BYTES

SOURCE = "bf16"


def converted_params(mem: Any, skip: list[str]) -> list[Any]:
    """The ParamInfo of every weight the patch stores in 16 bits (as :mod:`hf_memkit.integrations.weight_storage`
    picks them on the real model)."""
    from torch import nn

    out, seen = [], set()
    for name, m in mem.model.named_modules():
        kind = type(m)
        if kind is not nn.Linear and kind is not nn.Embedding:
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if kind is nn.Embedding and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
            continue
        info = mem.param(name + ".weight")
        if info is None or info.name in seen:
            continue
        if info.storage_bytes != info.numel * mem.dtype_bytes:  # stored otherwise already (quantized base)
            continue
        seen.add(info.name)
        out.append(info)
    return out


def add_terms(mem: Any, cfg: Any) -> None:
    low = 2
    params = converted_params(mem, list(cfg.skip_modules))
    wider = mem.dtype_bytes - low
    for info in params:
        if wider > 0:
            mem.set_storage(info.name, info.numel * low, f"{cfg.dtype} storage ({SOURCE})")
    trained = [p for p in params if p.trainable]
    trained_numel = sum(p.numel for p in trained)
    if wider > 0 and trained_numel:
        mem.add("gradients", -trained_numel * wider, SOURCE, f"{cfg.dtype} gradients of the {cfg.dtype} weights")
    if cfg.update == "kahan" and trained_numel:
        mem.add("optimizer_states", trained_numel * low, SOURCE, f"Kahan compensation, {cfg.dtype}")
    step = 0
    if trained:
        largest = max(p.numel for p in trained)
        sr = min(largest, CHUNK) * 4 * 3 if cfg.update == "stochastic" else 0
        step = largest * 8 + sr  # fp32 weight + fp32 gradient of one parameter, SR scratch
    linear = max((min(p.numel * 4, UPCAST_BLOCK_BYTES) for p in params), default=0)
    matmul = linear * (2 if trained else 1)  # the upcast block, and the fp32 block of its gradient
    transient = max(step, matmul)
    if transient:
        mem.add("precision_buffers", transient, SOURCE,
                "transient: fp32 copy of the largest 16-bit weight and its gradient in the optimizer step, or "
                "one fp32 weight block in a Linear")
