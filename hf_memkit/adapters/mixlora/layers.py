"""PEFT tuner layers of MixLoRA: :class:`MixLoraLinear` (plain LoRA on an attention projection) and
:class:`MixLoraFFN` (router + LoRA experts around a frozen FFN). Everything on a layer except ``base_layer`` is
adapter state, so PEFT saves and loads it structurally; keys look like
``...self_attn.q_proj.mixlora_A.weight``, ``...mlp.mixlora_router`` ``[E, d]`` (fp32) and
``...mlp.mixlora_experts.gate_proj_A`` ``[E, r, in]`` / ``..._B`` ``[E, out, r]``."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...errors import IncompatibleModelError
from .ffn import FFNKind, load_balance_loss, mixture_forward, projection_shape


def _kaiming_(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class MixLoraLinear(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("mixlora_A", "mixlora_B")
    other_param_names = ("scaling", "mixlora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, name: str = ""):
        super().__init__()
        shape = projection_shape(base_layer)
        if shape is None:
            raise IncompatibleModelError(
                f"MixLoRA: target module {name or type(base_layer).__name__} is a {type(base_layer).__name__}, not "
                "an nn.Linear or Conv1D; list only the attention projections in target_modules"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = shape
        self.mixlora_A = nn.ModuleDict()
        self.mixlora_B = nn.ModuleDict()
        self.mixlora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config: Any) -> None:
        ref = self.base_layer.weight
        self.mixlora_A[adapter_name] = nn.Linear(self.in_features, config.r, bias=False, device=ref.device)
        self.mixlora_B[adapter_name] = nn.Linear(config.r, self.out_features, bias=False, device=ref.device)
        self.mixlora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling[adapter_name] = config.scaling
        with torch.no_grad():
            _kaiming_(self.mixlora_A[adapter_name].weight)
            if config.init_lora_weights:
                nn.init.zeros_(self.mixlora_B[adapter_name].weight)
            else:
                _kaiming_(self.mixlora_B[adapter_name].weight)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return y
        for name in self.active_adapters:
            if name not in self.mixlora_A:
                continue
            A, B = self.mixlora_A[name], self.mixlora_B[name]
            h = self.mixlora_dropout[name](x).to(A.weight.dtype)
            y = y + (B(A(h)) * self.scaling[name]).to(y.dtype)
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        w = self.mixlora_B[name].weight @ self.mixlora_A[name].weight * self.scaling[name]  # [out, in]
        return w if isinstance(self.base_layer, nn.Linear) else w.t()  # Conv1D stores [in, out]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in adapter_names or self.active_adapters:
            with torch.no_grad():
                w = self.base_layer.weight
                w += self.delta_weight(name).to(w.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                w = self.base_layer.weight
                w -= self.delta_weight(name).to(w.dtype)


class _Experts(nn.Module):
    """One adapter's experts of one FFN: for each projection p, ``p_A [E, r, in]`` and ``p_B [E, out, r]``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], num_experts: int, r: int, init_b_zero: bool,
                 device: Any):
        super().__init__()
        self.names = tuple(shapes)
        for p, (fin, fout) in shapes.items():
            A = torch.empty(num_experts, r, fin, device=device)
            B = torch.empty(num_experts, fout, r, device=device)
            for e in range(num_experts):  # per expert: kaiming on a 3-D tensor would use the wrong fan-in
                _kaiming_(A[e])
                if init_b_zero:
                    B[e].zero_()
                else:
                    _kaiming_(B[e])
            setattr(self, f"{p}_A", nn.Parameter(A))
            setattr(self, f"{p}_B", nn.Parameter(B))

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {p: (getattr(self, f"{p}_A"), getattr(self, f"{p}_B")) for p in self.names}


class MixLoraFFN(nn.Module, BaseTunerLayer):
    """The MoE layer: ``base_layer`` is the frozen FFN module; the router and the experts are adapter state.
    The last forward's router logits stay on the layer (``router_logits``) for :func:`router_loss`."""

    adapter_layer_names = ("mixlora_router", "mixlora_experts")
    other_param_names = ("scaling", "mixlora_dropout", "top_k", "num_experts", "jitter", "aux_coef")

    def __init__(self, base_layer: nn.Module, kind: FFNKind, adapter_name: str, config: Any):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.hidden = projection_shape(getattr(base_layer, kind.inner[0]))[0]
        self.mixlora_router = nn.ParameterDict()
        self.mixlora_experts = nn.ModuleDict()
        self.mixlora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.top_k: dict[str, int] = {}
        self.num_experts: dict[str, int] = {}
        self.jitter: dict[str, float] = {}
        self.aux_coef: dict[str, float] = {}
        self.router_logits: torch.Tensor | None = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config: Any) -> None:
        device = getattr(self.base_layer, self.kind.outer).weight.device
        shapes = {p: projection_shape(getattr(self.base_layer, p)) for p in (*self.kind.inner, self.kind.outer)}
        router = torch.empty(config.num_experts, self.hidden, dtype=torch.float32, device=device)
        nn.init.normal_(router, std=config.router_init_range)
        self.mixlora_router[adapter_name] = nn.Parameter(router)
        self.mixlora_experts[adapter_name] = _Experts(shapes, config.num_experts, config.r,
                                                      bool(config.init_lora_weights), device)
        self.mixlora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling[adapter_name] = config.scaling
        self.top_k[adapter_name] = config.top_k
        self.num_experts[adapter_name] = config.num_experts
        self.jitter[adapter_name] = config.jitter_noise
        self.aux_coef[adapter_name] = config.router_aux_loss_coef
        self.set_adapter(self.active_adapters)

    def _active(self) -> str | None:
        names = [n for n in self.active_adapters if n in self.mixlora_router]
        if len(names) > 1:
            raise IncompatibleModelError(
                f"MixLoRA routes through one adapter at a time, but {names} are active; call "
                "model.set_adapter(name) with a single adapter"
            )
        return names[0] if names else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if self.disable_adapters else self._active()
        if name is None:
            self.router_logits = None
            return self.base_layer(x, *args, **kwargs)
        router = self.mixlora_router[name]
        h = x.reshape(-1, x.shape[-1]).to(router.dtype)
        eps = self.jitter[name]
        if self.training and eps > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)
        logits = h @ router.t()
        # kept for the load-balance loss of this training step only (a graph-holding tensor would also break
        # deepcopy of the model)
        self.router_logits = logits if self.training and torch.is_grad_enabled() else None
        return mixture_forward(self.base_layer, self.kind, x, logits, self.top_k[name],
                               self.mixlora_experts[name].factors(), self.scaling[name],
                               self.mixlora_dropout[name])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise IncompatibleModelError(
            "MixLoRA experts are chosen per token, so they cannot be merged into the FFN weights; save the adapter "
            "(model.save_pretrained) and load it with PeftModel.from_pretrained instead"
        )

    def unmerge(self) -> None:
        return None


def router_loss(model: Any, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The load-balance loss of the last forward of ``model`` (a PeftModel or anything containing MixLoRA
    layers), with ``router_aux_loss_coef`` already applied; None when no MixLoRA layer routed anything."""
    layers = [m for m in model.modules() if isinstance(m, MixLoraFFN) and m.router_logits is not None]
    if not layers:
        return None
    name = layers[0]._active()
    mask = None
    if attention_mask is not None and attention_mask.numel() == layers[0].router_logits.shape[0]:
        mask = attention_mask
    loss = load_balance_loss([m.router_logits for m in layers], layers[0].top_k[name], layers[0].aux_coef[name],
                             mask)
    for m in layers:
        m.router_logits = None
    return loss
