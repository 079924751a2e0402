"""Writing fp32 values into a 16-bit tensor in place, chunk by chunk: the random integers and bit patterns of
stochastic rounding cost 4 bytes per element each, so a 28M-element embedding would need several 113 MiB
temporaries at once; chunks bound them to a few MiB."""

from __future__ import annotations

import torch

from .reference import SIXTEEN_BIT, stochastic_round

#: elements per chunk (4 MiB of fp32)
CHUNK = 1 << 20
MODES = ("stochastic", "nearest")


def round_into_(out: torch.Tensor, x: torch.Tensor, mode: str = "stochastic",
                generator: torch.Generator | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """``out[...] = round(x)`` where ``out`` is a 16-bit tensor and ``x`` its fp32 value (same shape).
    ``mode``: ``stochastic`` (unbiased, :func:`~.reference.stochastic_round`) or ``nearest`` (RN, a plain
    ``copy_``). Draws happen chunk by chunk in order, so the result depends only on the generator state."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a rounding mode; use one of {', '.join(MODES)}")
    if out.shape != x.shape:
        raise ValueError(f"round_into_: shapes differ ({tuple(out.shape)} vs {tuple(x.shape)})")
    if mode == "nearest" or out.dtype not in SIXTEEN_BIT:
        return out.copy_(x)
    if not out.is_contiguous():
        raise ValueError("round_into_ writes into a contiguous tensor")
    flat_out, flat_x = out.view(-1), x.reshape(-1)
    for s in range(0, flat_out.numel(), chunk):
        piece = flat_x[s:s + chunk]
        flat_out[s:s + chunk] = stochastic_round(piece.float(), out.dtype, generator)
    return out
