"""Stochastic rounding fp32 → bf16/fp16 (unbiased: E[SR(x)] = x), in plain PyTorch with a seedable generator.

``stochastic_round(x, dtype, generator)`` returns a new tensor; ``round_into_(out16, x32, mode, generator)`` writes
in place chunk by chunk (bounded temporaries). See :mod:`.reference` for the two algorithms (the bf16 bit trick
and the neighbour method for fp16). There is no Triton kernel: on GPU the same few element-wise torch ops run
there, and the write is memory-bound either way.
"""

from .reference import sr_bf16_bits, sr_neighbours, stochastic_round
from .write import round_into_

__all__ = ["stochastic_round", "round_into_", "sr_bf16_bits", "sr_neighbours"]
