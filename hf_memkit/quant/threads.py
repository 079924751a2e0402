"""One intra-op thread for the quantizers' many small operations on CPU.

GPTQ's column loop (a handful of vector ops per weight column) and LoRC's per-layer SVD are too small to split
across threads; on a shared CPU, OpenMP's synchronisation then dominates: measured on a 2-core machine under load,
a 576x1536 GPTQ layer took 32 s with 2 threads and 1.7 s with one, a 576x576 fp64 SVD 16 s and 0.26 s.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch


@contextlib.contextmanager
def single_thread(tensor: "torch.Tensor") -> Iterator[None]:
    """``torch.set_num_threads(1)`` for the duration, when ``tensor`` lives on the CPU (GPUs are unaffected)."""
    import torch

    if tensor.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
