"""How a quantized ``nn.Linear`` carries its quantization in memory.

After a post-training pass the module stays a plain ``nn.Linear`` (so the model's structure, its state-dict keys
and every downstream tool are unchanged); its ``weight`` holds the dequantized values and three
*non-persistent* buffers hold the source of truth: ``weight_codes`` (uint8 ``[out, in]``), ``weight_scale``
(``[out, groups]``) and ``weight_zero_point`` (uint8 ``[out, groups]``), plus the :class:`QuantSpec` in
``memkit_quant_spec``. The exporter packs the codes, never re-derives them from the float weight. A LoRC
compensation adds ``lorc_A``/``lorc_B`` buffers and a forward hook ``y += A(Bx)`` (the side branch must stay
separate: folding it into ``weight`` would leave the grid).

Training-time modules (E2E-QP's ``QuantLinear``) expose the same information through a ``quantized_weight()``
method; :func:`quantized_modules` reads both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ..errors import IncompatibleModelError
from .grid import QuantizedWeight, QuantSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

SPEC_ATTR = "memkit_quant_spec"
LORC_ATTR = "memkit_lorc"
_HOOK_ATTR = "_memkit_lorc_hook"
QUANT_BUFFERS = ("weight_codes", "weight_scale", "weight_zero_point")
LORC_BUFFERS = ("lorc_A", "lorc_B")


def matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` equals a pattern or ends with ``.pattern`` (PEFT's list rule, as everywhere)."""
    from ..integrations.anatomy import name_matches

    return name_matches(name, patterns)


def target_linears(model: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Every module of exact type ``nn.Linear`` (subclasses such as bitsandbytes layers are not plain weights)
    whose name is not in ``skip``, in module order."""
    import torch

    skip = list(skip)
    return {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and not matches(n, skip)}


def require_targets(model: Any, skip: Iterable[str], key: str) -> dict[str, Any]:
    targets = target_linears(model, skip)
    if not targets:
        import torch

        others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)} - {"Linear"})
        extra = f" (it has {', '.join(others)} layers, which are already quantized or not plain Linear)" if others else ""
        raise IncompatibleModelError(
            f"{key}: {type(model).__name__} has no nn.Linear layer to quantize{extra}; weight quantization needs "
            "plain torch.nn.Linear modules (GPT-2 style Conv1D is not supported). Check skip_modules, or use a "
            "model whose projections are nn.Linear"
        )
    return targets


def set_quantized_(linear: Any, qw: QuantizedWeight) -> None:
    """Write ``qw`` into ``linear``: dequantized values into ``weight`` (same storage), codes into buffers."""
    import torch

    if tuple(linear.weight.shape) != qw.shape:
        raise IncompatibleModelError(f"codes of shape {qw.shape} do not fit a weight of shape {tuple(linear.weight.shape)}")
    with torch.no_grad():
        linear.weight.copy_(qw.dequantize().to(linear.weight.dtype))
    dev = linear.weight.device
    for name, t in zip(QUANT_BUFFERS, (qw.codes, qw.scale, qw.zero)):
        linear.register_buffer(name, t.detach().to(dev), persistent=False)
    setattr(linear, SPEC_ATTR, qw.spec)


def quantized_weight(module: Any) -> QuantizedWeight | None:
    """The codes of a quantized module (plain Linear with buffers, or a module with ``quantized_weight()``)."""
    fn = getattr(module, "quantized_weight", None)
    if callable(fn):
        return fn()
    spec = getattr(module, SPEC_ATTR, None)
    if spec is None:
        return None
    return QuantizedWeight(module.weight_codes, module.weight_scale, module.weight_zero_point, spec)


def is_quantized(module: Any) -> bool:
    return getattr(module, SPEC_ATTR, None) is not None or callable(getattr(module, "quantized_weight", None))


def quantized_modules(model: Any) -> list[tuple[str, Any, QuantizedWeight]]:
    out = []
    for name, m in model.named_modules():
        qw = quantized_weight(m)
        if qw is not None:
            out.append((name, m, qw))
    return out


def clear_quantized_(linear: Any) -> None:
    """Drop the quantization buffers and any LoRC branch (the weight values are left as they are)."""
    for name in QUANT_BUFFERS:
        linear._buffers.pop(name, None)
    if hasattr(linear, SPEC_ATTR):
        delattr(linear, SPEC_ATTR)
    remove_lorc_(linear)


# ---------------------------------------------------------------------------------------------------------
# LoRC side branch


def _lorc_hook(module: Any, args: tuple, output: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    x = args[0]
    # the same two matmuls, in the same order, as a PEFT LoRA layer with scaling 1 (lora_B(lora_A(x)))
    return output + F.linear(F.linear(x, module.lorc_B.to(x.dtype)), module.lorc_A.to(x.dtype))


def set_lorc_(linear: Any, A: "torch.Tensor", B: "torch.Tensor", meta: dict[str, Any]) -> None:
    """Attach ``y += A(Bx)`` (A ``[out, r]``, B ``[r, in]``) as non-persistent buffers and a forward hook."""
    remove_lorc_(linear)
    dev = linear.weight.device
    linear.register_buffer("lorc_A", A.detach().to(dev), persistent=False)
    linear.register_buffer("lorc_B", B.detach().to(dev), persistent=False)
    setattr(linear, LORC_ATTR, dict(meta))
    setattr(linear, _HOOK_ATTR, linear.register_forward_hook(_lorc_hook))


def lorc_factors(module: Any) -> tuple["torch.Tensor", "torch.Tensor", dict] | None:
    meta = getattr(module, LORC_ATTR, None)
    if meta is None:
        return None
    return module.lorc_A, module.lorc_B, meta


def remove_lorc_(linear: Any) -> None:
    handle = getattr(linear, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(linear, _HOOK_ATTR)
    for name in LORC_BUFFERS:
        linear._buffers.pop(name, None)
    if hasattr(linear, LORC_ATTR):
        delattr(linear, LORC_ATTR)


def spec_of(module: Any) -> QuantSpec | None:
    qw = quantized_weight(module)
    return qw.spec if qw is not None else None
