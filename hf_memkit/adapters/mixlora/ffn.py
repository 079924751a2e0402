"""The MixLoRA FFN, in plain PyTorch: which FFN shapes are supported, the top-k router, the mixture forward,
and the router's load-balance loss. No PEFT here; the PEFT layers in :mod:`.layers` call these functions.

Mixture forward. Expert ``i`` is the frozen FFN with LoRA deltas on its projections; for SwiGLU
``E_i(h) = (W_d + ΔW_d^i)·a_i`` with ``a_i = SiLU((W_g + ΔW_g^i)h) ⊙ (W_u + ΔW_u^i)h``, and the layer returns
``Σ_{i∈topk} w_i·E_i(h)`` with ``Σ w_i = 1``. Because ``W_d`` is linear and the weights sum to one,
``Σ w_i·W_d·a_i = W_d·(a + Σ w_i·(a_i − a))`` where ``a`` is the frozen FFN's own activation; so every frozen
projection (gate, up *and* down) runs once per token on all tokens, and each expert only adds its LoRA deltas
on its own tokens. With ``B = 0`` every ``a_i − a`` and every ``ΔW_d^i·a_i`` is exactly zero, so the output is
the frozen FFN's output bit for bit, whatever the router does. :mod:`.reference` computes the same thing the
naive way (every expert in full) for the tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import IncompatibleModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class FFNKind:
    name: str  # "swiglu" | "two_layer"
    inner: tuple[str, ...]  # projections applied to the FFN input (gate, up | fc)
    outer: str  # projection applied to the activation (down | proj)
    act: str  # attribute holding the activation function


#: model families differ only in attribute names: Llama/Qwen2/Mistral/Gemma (SwiGLU), GPT-2, GPT-NeoX, OPT-style
FFN_KINDS = (
    FFNKind("swiglu", ("gate_proj", "up_proj"), "down_proj", "act_fn"),
    FFNKind("two_layer", ("c_fc",), "c_proj", "act"),
    FFNKind("two_layer", ("dense_h_to_4h",), "dense_4h_to_h", "act"),
    FFNKind("two_layer", ("fc1",), "fc2", "activation_fn"),
)
#: children an FFN module may have besides its projections and activation (applied after the output projection)
_ALLOWED_EXTRA = ("dropout",)


def projection_shape(module: Any) -> tuple[int, int] | None:
    """(in, out) of an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's transposed Linear); None otherwise."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.weight.shape[0]), int(module.nf)
    return None


def ffn_kind(module: Any) -> FFNKind | None:
    """The kind of ``module`` when it is exactly a supported FFN (its children are the projections, the
    activation and at most a dropout), else None."""
    children = {n for n, _ in module.named_children()}
    for kind in FFN_KINDS:
        names = (*kind.inner, kind.outer)
        if not all(hasattr(module, n) for n in (*names, kind.act)):
            continue
        if not children <= {*names, kind.act, *_ALLOWED_EXTRA}:
            continue
        if all(projection_shape(getattr(module, n)) is not None for n in names):
            return kind
    return None


def require_ffn_kind(name: str, module: Any, key: str) -> FFNKind:
    kind = ffn_kind(module)
    if kind is None:
        children = ", ".join(f"{n}: {type(c).__name__}" for n, c in module.named_children()) or "none"
        raise IncompatibleModelError(
            f"{key}: {name} ({type(module).__name__}; children {children}) is not an FFN MixLoRA supports. "
            "Supported: SwiGLU (gate_proj, up_proj, down_proj, act_fn: Llama, Qwen2, Mistral) and two-layer FFNs "
            "(c_fc/c_proj/act as in GPT-2, dense_h_to_4h/dense_4h_to_h, fc1/fc2) whose projections are nn.Linear "
            "or Conv1D. Set ffn_modules to the name of the model's FFN blocks, or use the lora adapter"
        )
    return kind


def route(logits: "torch.Tensor", top_k: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Top-k of ``softmax(logits)``, renormalised to sum to one: (weights ``[N, k]``, expert ids ``[N, k]``)."""
    import torch

    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def lora_delta(x: "torch.Tensor", A: "torch.Tensor", B: "torch.Tensor", scaling: float, dropout: Any) -> "torch.Tensor":
    """``scaling · B(A(dropout(x)))`` in the factors' dtype, returned in ``x``'s dtype."""
    xd = dropout(x).to(A.dtype)
    return ((xd @ A.t()) @ B.t() * scaling).to(x.dtype)


def mixture_forward(ffn: Any, kind: FFNKind, x: "torch.Tensor", logits: "torch.Tensor", top_k: int,
                    experts: dict[str, tuple["torch.Tensor", "torch.Tensor"]], scaling: float,
                    dropout: Any) -> "torch.Tensor":
    """The MixLoRA FFN output for input ``x`` (``[..., d]``) and router ``logits`` (``[N, E]``, N = tokens).
    ``experts[proj] = (A [E, r, in], B [E, out, r])`` for every projection of ``kind``."""
    import torch

    act = getattr(ffn, kind.act)
    inner = [getattr(ffn, n)(x) for n in kind.inner]  # frozen projections, once, on all tokens
    a = act(inner[0]) * inner[1] if kind.name == "swiglu" else act(inner[0])
    weights, ids = route(logits, top_k)
    xf = x.reshape(-1, x.shape[-1])
    inner_f = [t.reshape(-1, t.shape[-1]) for t in inner]
    a_f = a.reshape(-1, a.shape[-1])
    mix = torch.zeros(xf.shape[0], a.shape[-1], dtype=a.dtype, device=a.device)
    out_shape = projection_shape(getattr(ffn, kind.outer))[1]
    out_delta = torch.zeros(xf.shape[0], out_shape, dtype=x.dtype, device=x.device)
    num_experts = logits.shape[-1]
    for e in range(num_experts):
        rows, slot = torch.where(ids == e)
        if rows.numel() == 0:
            continue
        w = weights[rows, slot].unsqueeze(-1)
        xe = xf[rows]
        parts = [t[rows] for t in inner_f]
        deltas = [p + lora_delta(xe, experts[n][0][e], experts[n][1][e], scaling, dropout)
                  for p, n in zip(parts, kind.inner)]
        ae = act(deltas[0]) * deltas[1] if kind.name == "swiglu" else act(deltas[0])
        mix.index_add_(0, rows, (w * (ae - a_f[rows])).to(mix.dtype))  # the base activation is shared
        A, B = experts[kind.outer]
        out_delta.index_add_(0, rows, (w * lora_delta(ae, A[e], B[e], scaling, dropout)).to(out_delta.dtype))
    y = getattr(ffn, kind.outer)(a + mix.view_as(a)) + out_delta.view(*x.shape[:-1], out_shape)
    extra = getattr(ffn, "dropout", None)
    return extra(y) if extra is not None else y


def load_balance_loss(logits: "list[torch.Tensor]", top_k: int, coef: float,
                      mask: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Switch/Mixtral load-balance loss over the router logits of every MixLoRA layer (each ``[N, E]``, the same
    N tokens): ``coef · E · Σ_{j<k, i<E} f[j, i] · P[i]``, with ``f[j, i]`` the fraction of tokens whose j-th
    choice is expert i and ``P[i]`` the mean router probability of expert i, over all layers' tokens; ``mask``
    (``[N]``, 1 = real token) leaves padding out. Perfectly uniform routing gives ``coef · k``; any skew gives
    more."""
    import torch

    flat = torch.cat([t.float() for t in logits], dim=0)
    E = flat.shape[-1]
    probs = torch.softmax(flat, dim=-1)
    _, ids = torch.topk(probs, top_k, dim=-1)
    chosen = torch.nn.functional.one_hot(ids, E).to(probs.dtype)  # [T, k, E]
    if mask is None:
        f, P = chosen.mean(0), probs.mean(0)
    else:
        m = mask.reshape(-1).to(probs.dtype).repeat(len(logits))
        total = m.sum().clamp_min(1)
        f = (chosen * m[:, None, None]).sum(0) / total
        P = (probs * m[:, None]).sum(0) / total
    return coef * E * (f * P.unsqueeze(0)).sum()
