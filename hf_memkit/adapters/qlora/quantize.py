"""Reversible in-place 4-bit quantization of a model's Linear layers with bitsandbytes.

The full-precision weights are snapshotted to a temporary safetensors file before they are replaced, so that
``restore`` gives back the original modules bit for bit without keeping a second copy in memory.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from typing import Any


def _parent(model: Any, name: str):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def quantize_linears_4bit_(model: Any, *, quant_type: str, double_quant: bool, compute_dtype: str,
                           blocksize: int, skip: list[str]) -> tuple[dict[str, Any], str]:
    """Replace each nn.Linear (except names ending in ``skip``) by ``bnb.nn.Linear4bit``. Returns the original
    modules (weights emptied) and the path of the snapshot holding their weights."""
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import save_file

    targets = {
        n: m for n, m in model.named_modules()
        if type(m) is torch.nn.Linear and not any(n == s or n.endswith("." + s) for s in skip)
    }
    if not targets:
        return {}, ""
    fd, path = tempfile.mkstemp(prefix="memkit-qlora-", suffix=".safetensors")
    os.close(fd)
    snapshot = {}
    for n, m in targets.items():
        snapshot[n + ".weight"] = m.weight.detach().contiguous()
        if m.bias is not None:
            snapshot[n + ".bias"] = m.bias.detach().contiguous()
    # tied or shared tensors must be saved once each: clone so safetensors accepts them
    save_file({k: v.clone() for k, v in snapshot.items()}, path)
    del snapshot
    dtype = getattr(torch, compute_dtype)
    for n, m in targets.items():
        q = bnb.nn.Linear4bit(
            m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=dtype,
            compress_statistics=double_quant, quant_type=quant_type, device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            m.weight.data, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant,
            blocksize=blocksize,
        ).to(m.weight.device)
        if m.bias is not None:
            q.bias = torch.nn.Parameter(m.bias.data.clone(), requires_grad=m.bias.requires_grad)
        parent, child = _parent(model, n)
        setattr(parent, child, q)
        # the original module keeps its identity (hooks, attributes) but lets go of its storage
        m.weight.data = torch.empty(0, dtype=m.weight.dtype, device=m.weight.device)
        if m.bias is not None:
            m.bias.data = torch.empty(0, dtype=m.bias.dtype, device=m.bias.device)
    from ...integrations.bnb_cpu import keep_4bit_trainable

    keep_4bit_trainable(model)  # bitsandbytes' CPU inference repacking would cut the input gradients
    weakref.finalize(model, _unlink, path)
    return targets, path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def restore_linears_(model: Any, originals: dict[str, Any], path: str) -> None:
    """Put the original Linear modules back, with their weights read from the snapshot."""
    if not originals:
        return
    from safetensors.torch import load_file

    saved = load_file(path)
    for n, m in originals.items():
        m.weight.data = saved[n + ".weight"].to(m.weight.device)
        if m.bias is not None:
            m.bias.data = saved[n + ".bias"].to(m.bias.device)
        parent, child = _parent(model, n)
        setattr(parent, child, m)
    _unlink(path)
