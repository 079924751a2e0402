"""A post-training compress pass beside the trained model: :func:`compress_aside` lends the pass the live model
and gives it back with its trained weights and per-module state, or hands a plain copy to a pass that rebuilds
modules."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

#: per-module attributes and buffers a compress pass sets (quantization, LoRC, 2:4 marks)
_MODULE_ATTRS = ("memkit_quant_spec", "memkit_lorc", "memkit_sparsity", "memkit_sparsity_mask")
_MODULE_BUFFERS = ("weight_codes", "weight_scale", "weight_zero_point", "lorc_A", "lorc_B")
_MODEL_ATTRS = ("_memkit_compress_report", "_memkit_exported", "_memkit_structured")


@contextlib.contextmanager
def compress_aside(model: Any, plan: Any) -> Iterator[Any]:
    """Yield the model a post-training compress pass (``plan``, a :class:`~hf_memkit.compress.plan.Plan`) may change
    and export; when the block exits, even on an error, ``model`` holds its trained weights again. The trained
    model and the compressed export are two outputs: ``trainer.save_model()`` after ``train()`` must write the
    former.

    Memory: the passes run in place on the live model as before (same device memory), and the trained
    parameters wait in host memory meanwhile (one CPU copy of the weights) and are copied back afterwards,
    together with the per-module quantization/LoRC/2:4 state as it was. A deep copy on the device would add the
    whole model to the peak at the end of training. Structural pruning (comp, l1_structured) rebuilds modules and
    edits the config, which copying values back cannot undo, so it runs on a deep copy (+1x the weights on the
    model's device while it runs; the copy has none of the training patches). Stage ``before`` (e2e_qp) yields the model itself: there the trained model *is*
    the quantized one."""
    if plan is None or plan.stage != "after":
        yield model
        return
    if plan.rebuilds_modules:
        import torch

        from ..integrations.patching import unpatched_copy

        # the copy without the training patches (Mesa's kernels, 16-bit storage forwards): it is exported as a
        # plain model, and pruning replaces its Linears
        work = unpatched_copy(model)
        # 16-bit storage keeps Linear/Embedding weights narrower than the rest and computes through its own
        # forwards, which the plain copy has not: the copy computes (and exports) in the widest dtype present,
        # exactly holding the stored values
        floats = {p.dtype for p in work.parameters() if p.is_floating_point()}
        if len(floats) > 1:
            widest = max(floats, key=lambda d: torch.finfo(d).bits)
            for p in work.parameters():
                if p.is_floating_point() and p.dtype != widest:
                    p.data = p.data.to(widest)
        yield work
        return
    saved = _snapshot(model)
    try:
        yield model
    finally:
        _restore(model, saved)


def _module_state(m: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({a: getattr(m, a) for a in _MODULE_ATTRS if hasattr(m, a)},
            {b: m._buffers[b] for b in _MODULE_BUFFERS if m._buffers.get(b) is not None})


def _snapshot(model: Any) -> dict[str, Any]:
    return {"params": {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()},
            "modules": {n: _module_state(m) for n, m in model.named_modules()},
            "model": {a: getattr(model, a) for a in _MODEL_ATTRS if hasattr(model, a)}}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _restore(model: Any, saved: dict[str, Any]) -> None:
    import torch

    from .linear import LORC_ATTR, clear_quantized_, set_lorc_

    for name, m in model.named_modules():
        attrs, bufs = saved["modules"].get(name, ({}, {}))
        now_attrs, now_bufs = _module_state(m)
        if _same(attrs, now_attrs) and _same(bufs, now_bufs):
            continue
        clear_quantized_(m)  # drops the codes, the spec and any LoRC branch with its forward hook
        for a in _MODULE_ATTRS:
            if hasattr(m, a):
                delattr(m, a)
        for b, t in bufs.items():
            if not b.startswith("lorc_"):
                m.register_buffer(b, t, persistent=False)
        for a, v in attrs.items():
            if a != LORC_ATTR:
                setattr(m, a, v)
        if LORC_ATTR in attrs:  # a branch that was there before (e.g. SLoRB) comes back with its hook
            set_lorc_(m, bufs["lorc_A"], bufs["lorc_B"], attrs[LORC_ATTR])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved["params"]:
                p.copy_(saved["params"][n].to(p.device, p.dtype))
    for a in _MODEL_ATTRS:
        if a in saved["model"]:
            setattr(model, a, saved["model"][a])
        elif hasattr(model, a):
            delattr(model, a)
