"""Reversible in-place 4-bit quantization of a model's Linear layers with bitsandbytes.

The full-precision weights are snapshotted to a temporary folder (one safetensors file per module) before they
are replaced, so that ``restore`` gives back the original modules bit for bit without keeping a second copy in
memory. One module at a time: a single snapshot of every weight needed a full-precision copy of all of them at
once (safetensors refuses tensors that share storage, and weights mapped from one file do), which made the
quantization the process peak of a qlora run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Any

from ...integrations.patching import parent_of, swap_module, unswap_module
from ...integrations.anatomy import name_matches


def quantize_linears_4bit_(model: Any, *, quant_type: str, double_quant: bool, compute_dtype: str,
                           blocksize: int, skip: list[str]) -> tuple[dict[str, Any], str]:
    """Replace each nn.Linear (except names ending in ``skip``) by ``bnb.nn.Linear4bit``. Returns the original
    modules (weights emptied) and the path of the snapshot holding their weights."""
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import save_file

    targets = {
        n: m for n, m in model.named_modules()
        if type(m) is torch.nn.Linear and not name_matches(n, skip)
    }
    if not targets:
        return {}, ""
    from ...memory.process import file_mappings, page_out_file_pages

    maps = sorted(file_mappings())
    path = tempfile.mkdtemp(prefix="memkit-qlora-")
    try:
        for i, (n, m) in enumerate(targets.items()):
            part = {"weight": m.weight.detach().contiguous().clone()}
            if m.bias is not None:
                part["bias"] = m.bias.detach().contiguous().clone()
            save_file(part, os.path.join(path, f"{i}.safetensors"), metadata={"module": n})
            del part
            page_out_file_pages([m.weight.data], maps)  # read once more below, one module at a time
    except BaseException:
        _unlink(path)
        raise
    dtype = getattr(torch, compute_dtype)
    for n, m in targets.items():
        full = m.weight.data
        q = bnb.nn.Linear4bit(
            m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=dtype,
            compress_statistics=double_quant, quant_type=quant_type, device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            full, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant,
            blocksize=blocksize,
        ).to(m.weight.device)
        if m.bias is not None:
            q.bias = torch.nn.Parameter(m.bias.data.clone(), requires_grad=m.bias.requires_grad)
        parent, child = parent_of(model, n)
        swap_module(parent, child, q, "qlora")
        # the original module keeps its identity (hooks, attributes) but lets go of its storage
        m.weight.data = torch.empty(0, dtype=m.weight.dtype, device=m.weight.device)
        # weights mapped from the model's file: the pages just read (snapshot, quantization) go back to the kernel
        # now, instead of all staying resident until the mapping closes (measured: the qlora build peaked at
        # 1,221 MiB, 562 of them file pages, above the training peak of 1,068)
        page_out_file_pages([full], maps)
        del full
        if m.bias is not None:
            m.bias.data = torch.empty(0, dtype=m.bias.dtype, device=m.bias.device)
    from ...integrations.bnb_cpu import keep_4bit_trainable
    from ...memory.process import own_file_mapped_

    keep_4bit_trainable(model)  # bitsandbytes' CPU inference repacking would cut the input gradients
    # the rest (embeddings, norms, lm_head) leaves the weights file's mapping: every page quantization read would
    # otherwise stay resident for as long as one of them keeps the mapping alive (measured: 569 MiB of file pages
    # at the peak of a SmolLM2 qlora run whose weights hold 158 MiB)
    own_file_mapped_(model)
    weakref.finalize(model, _unlink, path)
    return targets, path


def _unlink(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def restore_linears_(model: Any, originals: dict[str, Any], path: str) -> None:
    """Put the original Linear modules back, with their weights read from the snapshot."""
    if not originals:
        return
    from safetensors.torch import load_file

    for i, (n, m) in enumerate(originals.items()):
        saved = load_file(os.path.join(path, f"{i}.safetensors"))
        m.weight.data = saved["weight"].to(m.weight.device)
        if m.bias is not None:
            m.bias.data = saved["bias"].to(m.bias.device)
        parent, child = parent_of(model, n)
        unswap_module(parent, child, m, "qlora")
    _unlink(path)
