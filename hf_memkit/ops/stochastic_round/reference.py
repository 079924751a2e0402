"""Stochastic rounding of fp32 values to a 16-bit float, in plain PyTorch (any device).

SR rounds ``x`` to one of its two neighbours in the target format, up with probability equal to the fractional
distance to the lower one, so ``E[SR(x)] = x``: many updates smaller than half an ulp add up in expectation,
where round-to-nearest (RN) would cancel every one of them.

Two implementations, checked against each other by the tests:

* :func:`sr_bf16_bits` — the bit trick of torchao's ``_fp32_to_bf16_sr``: bf16 is the upper half of fp32, so
  adding a uniform random integer in [0, 2^16) to the fp32 bit pattern and clearing the low 16 bits rounds away
  from zero with probability ``low16 / 2^16``. A carry into the exponent is the correct next binade; a NaN keeps
  its RN cast (a payload that lives only in the low bits would otherwise truncate to Inf).
* :func:`sr_neighbours` — for any 16-bit float (fp16 needs it: it is not a truncated fp32): the RN neighbour,
  the other neighbour through ``nextafter``, and a uniform draw against the fractional distance.

Randomness comes from a ``torch.Generator`` so that runs (and data-parallel ranks sharing a seed) are
reproducible; without one the global generator is used.
"""

from __future__ import annotations

import torch

#: 0xFFFF0000 as a signed int32 (torch has no uint32 arithmetic)
_HIGH16 = -65536
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def _randint16(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, 1 << 16, shape, dtype=torch.int32, device=device, generator=generator)


def sr_bf16_bits(x: torch.Tensor, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 stochastic rounding of the fp32 tensor ``x`` (a new tensor). ``noise``: int32 values in [0, 2^16) to
    use instead of drawing them (tests)."""
    if x.dtype != torch.float32:
        raise TypeError(f"sr_bf16_bits takes fp32 input, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    r = noise if noise is not None else _randint16(x.shape, x.device, generator)
    out = (bits + r).bitwise_and_(_HIGH16).view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero
    nan = torch.isnan(x)
    if bool(nan.any()):
        out = torch.where(nan, x.to(torch.bfloat16), out)
    return out


def sr_neighbours(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None,
                  uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Stochastic rounding of fp32 ``x`` to ``dtype`` (bf16 or fp16) from the two neighbours: ``near`` = RN(x),
    ``other`` = the neighbour on x's other side; ``other`` is taken with probability |x − near| / |other − near|.
    ``uniform``: U[0, 1) draws to use instead of the generator's (tests). Values beyond the format's range
    round to ±Inf as RN does."""
    if x.dtype != torch.float32:
        raise TypeError(f"sr_neighbours takes fp32 input, got {x.dtype}")
    near = x.to(dtype)
    near32 = near.float()
    toward = torch.where(x > near32, torch.tensor(float("inf"), device=x.device),
                         torch.tensor(float("-inf"), device=x.device)).to(dtype)
    other = torch.nextafter(near, toward)
    gap = (other.float() - near32).abs_()
    dist = (x - near32).abs_()
    p = torch.where(gap > 0, dist / gap, torch.zeros_like(dist)).nan_to_num_(0.0)
    u = uniform if uniform is not None else torch.rand(x.shape, device=x.device, generator=generator)
    take = (u < p) & torch.isfinite(near32) & (x != near32)
    return torch.where(take, other, near)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (any float dtype; computed from its fp32 value) stochastically rounded to ``dtype`` (bf16 or fp16).
    fp32/fp64 targets are returned as a plain cast: there is nothing to round."""
    if dtype not in SIXTEEN_BIT:
        return x.to(dtype)
    x32 = x if x.dtype == torch.float32 else x.float()
    if dtype == torch.bfloat16:
        return sr_bf16_bits(x32, generator)
    return sr_neighbours(x32, dtype, generator)
