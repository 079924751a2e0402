"""The compressed-tensors ``sparse-24-bitmask`` layout, written and read by hf_memkit itself.

Per 2-D weight (spec: compressed-tensors ``sparse_24_bitmask.py``, the format vLLM reads): ``<module>.shape``
(int64 ``[2, 1]``), ``<module>.compressed`` (``[rows, cols/2]``, the kept values in the weight's dtype, row-major)
and ``<module>.bitmask`` (uint8 ``[rows, ceil(cols/8)]``, the keep mask packed LSB-first per row, as numpy's
``packbits(..., bitorder="little")``). compressed-tensors 0.20 removed its sparse compressors, so the codec lives
here; :func:`decompress` is its exact inverse (tested bit for bit).

The mask stored is the layer's own 2:4 mask when it has one (so kept weights that are exactly zero stay kept),
else the top-2 ``|w|`` of each group of 4 with hf_memkit's tie-breaking; a weight with more than 2 nonzeros in a
group is refused instead of silently dropping values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import IncompatibleModelError
from .masks import magnitude_scores, nm_counts, nm_mask

if TYPE_CHECKING:  # pragma: no cover
    import torch

SUFFIXES = ("compressed", "bitmask", "shape")


def pack_bitmask(mask: "torch.Tensor") -> "torch.Tensor":
    import torch

    rows, cols = mask.shape
    pad = (-cols) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(rows, -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=mask.device))
    return (bits.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bitmask(packed: "torch.Tensor", cols: int) -> "torch.Tensor":
    import torch

    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[..., None] >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].to(torch.bool)


def compress(weight: "torch.Tensor", mask: "torch.Tensor | None" = None, *, name: str = "weight"
             ) -> dict[str, "torch.Tensor"]:
    """``{compressed, bitmask, shape}`` of an exactly 2:4 weight (local names)."""
    import torch

    w = weight.detach()
    if w.dim() != 2 or w.shape[1] % 4:
        raise IncompatibleModelError(f"{name}: sparse-24-bitmask stores 2-D weights whose width is a multiple of 4; "
                                     f"got shape {tuple(w.shape)}")
    if mask is None:
        if bool((nm_counts(w) > 2).any()):
            raise IncompatibleModelError(
                f"{name}: has more than 2 nonzeros in some group of 4, so it is not 2:4 sparse; prune it first "
                "(compress: [{magnitude_24: {}}]) instead of letting the export drop values")
        mask = nm_mask(magnitude_scores(w), 2, 4, name=name)
    mask = mask.to(torch.bool)
    if bool((w[~mask] != 0).any()):
        raise IncompatibleModelError(f"{name}: nonzero values outside its 2:4 mask; project the weight first")
    if not bool((nm_counts(mask) == 2).all()):
        raise IncompatibleModelError(f"{name}: its mask does not keep exactly 2 of every 4")
    rows, cols = w.shape
    return {"compressed": w[mask].reshape(rows, cols // 2).contiguous(),
            "bitmask": pack_bitmask(mask).contiguous(),
            "shape": torch.tensor([[rows], [cols]], dtype=torch.int64)}


def decompress(tensors: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    import torch

    rows, cols = (int(x) for x in tensors["shape"].flatten().tolist())
    mask = unpack_bitmask(tensors["bitmask"], cols)
    out = torch.zeros(rows, cols, dtype=tensors["compressed"].dtype, device=tensors["compressed"].device)
    out[mask] = tensors["compressed"].reshape(-1)
    return out


def stored_bytes(rows: int, cols: int, element_size: int) -> int:
    return rows * cols // 2 * element_size + rows * ((cols + 7) // 8) + 16
