"""Which modules Mesa covers and how: each covered module gets an instance-level ``forward`` (its class, state
dict and hooks are untouched) that routes through the 8-bit autograd Functions while gradients are being
recorded, and through the original forward otherwise (evaluation, ``no_grad``). ``remove()`` deletes the
instance attributes and restores the attention implementation.

Covered (by class, a small table — families differ only in names):

* ``nn.Linear`` — input (only when the weight trains; otherwise nothing is saved anyway)
* Llama-style RMSNorm (``LLAMA_RMSNORMS``) and ``nn.LayerNorm`` — input (1/rms, mean stay fp32)
* gated MLPs ``down(act(gate(x)) * up(x))`` (class name ending in ``MLP`` with ``gate_proj``/``up_proj``/
  ``down_proj``/``act_fn``) — the gate and up outputs; other activation modules (``ACTIVATIONS``) — their input
* eager attention — q, k, v and the softmax output, one range per head (through
  :mod:`hf_memkit.integrations.attention`). SDPA and flash attention keep their own exact saved tensors.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...integrations.patching import base_forward, part_state, parts_of
from .functions import MesaActivation, MesaAttention, MesaGatedActivation, MesaLayerNorm, MesaLinear, MesaRMSNorm
from .quantizer import PackCache, RangeTracker

ATTENTION_NAME = "memkit_mesa_eager"
#: RMSNorm classes whose forward is exactly w * (x_fp32 * rsqrt(mean(x²) + eps)).to(dtype)
LLAMA_RMSNORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm"}
ACTIVATIONS = {"SiLU", "SiLUActivation", "GELU", "GELUActivation", "NewGELUActivation", "PytorchGELUTanh",
               "GELUTanh", "FastGELUActivation", "GELUTanhActivation"}


def _grad_on() -> bool:
    return torch.is_grad_enabled()


class MesaPatcher:
    def __init__(self, groups: int, ema_decay: float, impl: str, cover: set[str], widen: bool = True):
        from ...integrations.patching import Patches

        self.groups, self.ema_decay, self.impl, self.cover, self.widen = groups, ema_decay, impl, cover, widen
        self.trackers: dict[str, RangeTracker] = {}
        self.cache = PackCache()
        self.patched: list[Any] = []
        self.covered: dict[str, str] = {}  # module name -> what is stored in 8 bits
        self.patches = Patches("mesa")

    def tracker(self, name: str, layout: str = "channels") -> RangeTracker:
        t = self.trackers.get(name)
        if t is None:
            t = self.trackers[name] = RangeTracker(name, layout, self.groups, self.ema_decay, self.impl,
                                                       self.widen)
        return t

    def _set_forward(self, module: Any, fwd: Callable, *state: Any) -> None:
        """``fwd(self, x)`` becomes ``module``'s forward through the patching layer, its state kept on the module
        (a deep copy of the model rebinds both to the copy, see :mod:`hf_memkit.integrations.patching`)."""
        self.patches.forward(module, fwd, *state)
        self.patched.append(module)

    # --- per kind -----------------------------------------------------------------------------------------
    def linear(self, name: str, m: Any) -> None:
        # the kernel part: composes with a weight view (AST's masked weight, CAST's scaled one)
        self.patches.linear_kernel(m, _linear_kernel, self.tracker(name + ":input"), self.cache)
        self.patched.append(m)
        self.covered[name] = "input"

    def rmsnorm(self, name: str, m: Any) -> None:
        eps = getattr(m, "variance_epsilon", None) or getattr(m, "eps", 1e-6)
        self._set_forward(m, _rmsnorm_forward, self.tracker(name + ":input"), self.cache, eps)
        self.covered[name] = "input"

    def layernorm(self, name: str, m: Any) -> None:
        self._set_forward(m, _layernorm_forward, self.tracker(name + ":input"), self.cache)
        self.covered[name] = "input"

    def activation(self, name: str, m: Any) -> None:
        self._set_forward(m, _activation_forward, self.tracker(name + ":input"), self.cache)
        self.covered[name] = "input"

    def gated_mlp(self, name: str, m: Any) -> None:
        self._set_forward(m, _gated_mlp_forward, self.tracker(name + ":gate"), self.tracker(name + ":up"),
                          self.cache)
        self.covered[name] = "gate and up outputs"

    def attention(self, model: Any) -> bool:
        from ...integrations.attention import attention_implementation, swap_eager_attention

        if attention_implementation(model) != "eager":
            return False
        for name, m in model.named_modules():
            if hasattr(m, "q_proj") and hasattr(m, "scaling") and hasattr(m, "num_key_value_groups"):
                self.patches.set_attr(m, "_memkit_mesa", (
                    {r: self.tracker(f"{name}:{r}", "heads") for r in ("q", "k", "v", "p")}, self.cache))
                self.patched.append(m)
                self.covered[name] = "q, k, v and softmax output (per head)"
        self.patches.on_remove(swap_eager_attention(model, ATTENTION_NAME, mesa_eager_attention))
        return True

    # --- all --------------------------------------------------------------------------------------------------
    def apply(self, model: Any) -> None:
        from ...integrations.hub_kernels import disable_hub_kernels

        self.patches.model = model
        restore = disable_hub_kernels(model, "Mesa replaces the forward of norms, MLPs and attention")
        if restore is not None:
            self.patches.on_remove(restore)  # undone last, after the forwards are gone
        gated = set()
        for name, m in model.named_modules():
            cls = type(m).__name__
            if cls.endswith("MLP") and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
                    and type(m.act_fn).__name__ in ACTIVATIONS and "mlp" in self.cover:
                self.gated_mlp(name, m)
                gated.add(id(m.act_fn))
        for name, m in model.named_modules():
            cls = type(m).__name__
            if type(m) is torch.nn.Linear and "linear" in self.cover:
                if "forward" not in parts_of(m):  # sparse update's sliced Linears save little already
                    self.linear(name, m)
            elif cls in LLAMA_RMSNORMS and "norm" in self.cover:
                self.rmsnorm(name, m)
            elif type(m) is torch.nn.LayerNorm and "norm" in self.cover:
                self.layernorm(name, m)
            elif cls in ACTIVATIONS and id(m) not in gated and "mlp" in self.cover:
                self.activation(name, m)
        if "attention" in self.cover:
            self.attention(model)
        self.patches.hook(model.register_forward_pre_hook(_clear_cache))
        self.patches.set_attr(model, "_memkit_mesa_cache", self.cache)

    def remove(self) -> None:
        self.patches.remove()
        self.patched.clear()
        self.cache.clear()


def _clear_cache(model: Any, args: Any) -> None:
    # reads the cache from the model, so that a deep-copied model clears its own copy
    cache = vars(model).get("_memkit_mesa_cache")
    if cache is not None:
        cache.clear()


# the forwards, bound to their module (see MesaPatcher._set_forward) ------------------------------------------------


def _linear_kernel(self: Any, x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
    tr, cache = part_state(self, "linear.kernel")
    if _grad_on() and weight.requires_grad:
        return MesaLinear.apply(x, weight, bias, tr, cache)
    return torch.nn.functional.linear(x, weight, bias)


def _rmsnorm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    (tr, cache, eps), orig = part_state(self, "forward"), base_forward(self)
    if _grad_on() and (x.requires_grad or self.weight.requires_grad):
        return MesaRMSNorm.apply(x, self.weight, eps, 0.0, tr, cache)
    return orig(x)


def _layernorm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    (tr, cache), orig = part_state(self, "forward"), base_forward(self)
    trains = self.weight is not None and self.weight.requires_grad
    if _grad_on() and (x.requires_grad or trains) and len(self.normalized_shape) == 1:
        return MesaLayerNorm.apply(x, self.weight, self.bias, self.eps, tr, cache)
    return orig(x)


def _activation_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    (tr, cache), orig = part_state(self, "forward"), base_forward(self)
    if _grad_on() and x.requires_grad:
        return MesaActivation.apply(x, orig, tr, cache)
    return orig(x)


def _gated_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    (tg, tu, cache), orig = part_state(self, "forward"), base_forward(self)
    if not _grad_on():
        return orig(x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.requires_grad or up.requires_grad:
        return self.down_proj(MesaGatedActivation.apply(gate, up, self.act_fn.forward, tg, tu, cache))
    return self.down_proj(self.act_fn.forward(gate) * up)


def mesa_eager_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float,
                         dropout: float = 0.0, **kwargs: Any):
    """Eager attention with 8-bit saved tensors; the exact eager path under no_grad, with dropout, or for an
    attention module this patch does not own."""
    from ...integrations.attention import eager_attention

    state = getattr(module, "_memkit_mesa", None)
    needs = query.requires_grad or key.requires_grad or value.requires_grad
    if state is None or not torch.is_grad_enabled() or not needs or (dropout and module.training):
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    trackers, cache = state
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min)
    out = MesaAttention.apply(query, key, value, mask, float(scaling), trackers, cache)
    return out.transpose(1, 2).contiguous(), None
