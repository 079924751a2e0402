"""Memory terms of 16-bit weight storage.

* ``weights``: each converted Linear/Embedding weight at 2 bytes per element (tied weights once; weights another
  technique already stores narrower — QLoRA's 4-bit base — are left as they are).
* ``gradients``: a trained 16-bit weight has a 16-bit gradient; the estimator later adds every trainable
  parameter at the model dtype, so this adds the (negative) difference.
* ``optimizer_states``: Kahan compensation buffers, 2 bytes per trained 16-bit element (``update: kahan``). The
  inner optimizer's own state is unchanged: it keeps what it keeps for an fp32 parameter.
* ``precision_buffers`` (transient, estimate-only): the largest optimizer step of one trained 16-bit weight, or,
  when larger, the Linear forward/backward's fp32 weight block and its fp32 gradient block. One step holds the
  fp32 copy of the weight and of its gradient (8 B per element), then either the inner optimizer's temporaries or
  the stochastic-rounding scratch (12 B per element, at most :data:`CHUNK` elements). A weight larger than
  ``step_chunk_mib`` of fp32 is stepped in slices of rows (:func:`.optimizer.slice_rows`), so for it the
  elements are one slice's. Inner temporaries per element (:data:`INNER_TEMPORARIES`): torch AdamW 8 B
  (``exp_avg_sq.sqrt()`` and its quotient by the bias correction; 4 B with ``foreach``, counted as 8), the
  bitsandbytes 8-bit AdamW on the CPU backend 20 B (``optimizer_update_8bit_blockwise`` dequantizes both moments
  to fp32, forms ``g * gnorm_scale`` and the denominator's ``sqrt`` and quotient; its CUDA kernel allocates
  none, so this is an upper bound there). Measured with the profiler on a sliced step: 16, 12 and 28 B per slice
  element in all. Other optimizers step whole weights and their temporaries are not counted. SmolLM2-135M with
  AdamW8bit and the default 4 MiB: 1,011,456-element slices of the 28.3M-element embedding, 27 MiB (756 MiB
  unsliced).
"""

from __future__ import annotations

from typing import Any

from ...ops.stochastic_round.write import CHUNK
from .functions import UPCAST_BLOCK_BYTES
from .optimizer import slice_rows

SOURCE = "bf16"
#: bytes per element the inner optimizer allocates while it steps one (fp32 view of a) parameter, by the source
#: of its ``optimizer_states`` term; ``None``: the Trainer's default optimizer, torch AdamW
INNER_TEMPORARIES = {"adamw": 8, None: 8, "adamw_8bit": 20}
#: stochastic rounding's scratch per element of a chunk (random integers, bit patterns, the result)
SR_BYTES = 12


def inner_optimizer(mem: Any) -> "str | None":
    """The optimizer technique that sized ``optimizer_states`` so far (the optimizer slot runs before this one),
    or None when none did (the Trainer's default, torch AdamW)."""
    sources = [t.source for t in mem.terms if t.category == "optimizer_states" and t.source != SOURCE]
    return sources[-1] if sources else None


def step_bytes(shape: tuple[int, ...], inner: "str | None", update: str, step_chunk: int) -> int:
    """Transient bytes of one 16-bit parameter's optimizer step (module docstring)."""
    numel = 1
    for s in shape:
        numel *= s
    temps = INNER_TEMPORARIES.get(inner)
    if temps is None:  # an optimizer the wrapper steps whole and whose scratch is not known here
        elems, temps = numel, 0
    else:
        rows = slice_rows(tuple(shape), step_chunk)
        elems = rows * (numel // shape[0]) if rows else numel
    sr = min(elems, CHUNK) * SR_BYTES if update == "stochastic" else 0
    return elems * 8 + max(elems * temps, sr)


def converted_params(mem: Any, skip: list[str]) -> list[Any]:
    """The ParamInfo of every weight the patch stores in 16 bits (as :mod:`hf_memkit.integrations.weight_storage`
    picks them on the real model)."""
    from torch import nn

    from ...integrations.anatomy import name_matches

    out, seen = [], set()
    for name, m in mem.model.named_modules():
        kind = type(m)
        if kind is not nn.Linear and kind is not nn.Embedding:
            continue
        if name_matches(name, skip):
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
    inner = inner_optimizer(mem)
    chunk = cfg.step_chunk_numel()
    step = max((step_bytes(p.shape, inner, cfg.update, chunk) for p in trained), default=0)
    linear = max((min(p.numel * 4, UPCAST_BLOCK_BYTES) for p in params), default=0)
    matmul = linear * (2 if trained else 1)  # the upcast block, and the fp32 block of its gradient
    transient = max(step, matmul)
    if transient:
        mem.add("precision_buffers", transient, SOURCE,
                "transient: one 16-bit weight's (or slice's) fp32 copy, fp32 gradient and the optimizer's "
                "temporaries in the optimizer step, or one fp32 weight block in a Linear")
