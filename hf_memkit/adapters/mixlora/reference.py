"""The naive MixLoRA FFN: every expert is the full FFN with its LoRA deltas, evaluated on every token, and the
outputs are mixed with the router's top-k weights. The tests check :func:`~.ffn.mixture_forward` against it,
and ``benchmarks/bench_adapters.py`` times it as the "E separate LoRA FFNs" baseline."""

from __future__ import annotations

from typing import Any

from .ffn import FFNKind, route


def reference_forward(ffn: Any, kind: FFNKind, x, logits, top_k: int, experts: dict, scaling: float):
    import torch

    def proj(name, h, e):
        A, B = experts[name]
        return getattr(ffn, name)(h) + scaling * (h @ A[e].t()) @ B[e].t()

    act = getattr(ffn, kind.act)
    weights, ids = route(logits, top_k)
    E = logits.shape[-1]
    dense = torch.zeros(*weights.shape[:-1], E, dtype=weights.dtype, device=weights.device)
    dense.scatter_(-1, ids, weights)  # [N, E]: the gate of each expert for each token, 0 when not chosen
    xf = x.reshape(-1, x.shape[-1])
    y = 0
    for e in range(E):
        inner = [proj(n, xf, e) for n in kind.inner]
        a = act(inner[0]) * inner[1] if kind.name == "swiglu" else act(inner[0])
        y = y + dense[:, e:e + 1].to(x.dtype) * proj(kind.outer, a, e)
    y = y.view(*x.shape[:-1], -1)
    extra = getattr(ffn, "dropout", None)
    return extra(y) if extra is not None else y
