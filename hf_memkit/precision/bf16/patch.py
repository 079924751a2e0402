"""The model side of 16-bit weight storage: convert weights in place, set instance forwards, undo both.

Conversion is ``param.data = param.data.to(dtype)``: the ``Parameter`` object stays, so tied weights stay tied and
the optimizer, PEFT and the Trainer keep their references. Everything else floating that arrives in 16 bits (a
model loaded with ``dtype=torch.bfloat16``: norms, biases, adapter weights, buffers) is widened to fp32, the compute
dtype. ``remove()`` restores each tensor's original dtype and the modules' forwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .functions import embedding16, linear16

logger = logging.getLogger("hf_memkit")
SIXTEEN = (torch.bfloat16, torch.float16)


@dataclass
class Converted:
    """One tensor whose dtype the patch changed: a parameter or a buffer (owner, attribute name)."""

    name: str
    tensor: torch.Tensor
    original: torch.dtype
    owner: Any = None
    attr: str = ""


@dataclass
class StorageReport:
    stored: list[str] = field(default_factory=list)       # parameter names now in 16 bits
    stored_numel: int = 0
    stored_bytes: int = 0
    rounded: list[str] = field(default_factory=list)      # fp32 weights whose values were not representable
    widened: list[str] = field(default_factory=list)      # 16-bit tensors made fp32 (norms, biases, adapters)
    kept: list[str] = field(default_factory=list)         # Linear/Embedding kept fp32, with the reason
    modules: int = 0


def _set_dtype_(p: torch.Tensor, dtype: torch.dtype) -> None:
    """Change a parameter's storage dtype in place (its gradient follows)."""
    grad = p.grad if isinstance(p, nn.Parameter) else None
    if grad is not None:
        p.grad = None
    p.data = p.data.to(dtype)
    if grad is not None:
        p.grad = grad.to(dtype)


def _linear_kernel(self: nn.Linear, x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
    return linear16(x, weight, bias)


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return embedding16(ids, self.weight, self.padding_idx)


class StoragePatch:
    def __init__(self, model: Any, dtype: torch.dtype, skip: list[str]):
        self.model, self.dtype, self.skip = model, dtype, list(skip)
        self.converted: list[Converted] = []
        self.forwards: list[nn.Module] = []
        from ...integrations.patching import Patches

        self.patches = Patches("bf16", model)
        self.report = StorageReport()
        self._kernels: Callable[[], None] | None = None

    def apply(self) -> StorageReport:
        from ...integrations.weight_storage import kernels_off, storage_targets

        self._kernels = kernels_off(self.model)
        linears, embeddings, kept = storage_targets(self.model, self.skip)
        self.report.kept = kept
        try:
            stored = self._store_weights({**embeddings, **linears})
            self._widen_the_rest(stored)
            for m in embeddings.values():
                self.patches.forward(m, _embedding_forward)
                self.forwards.append(m)
            for m in linears.values():
                self.patches.linear_kernel(m, _linear_kernel)
                self.forwards.append(m)
        except Exception:
            self.remove()
            raise
        self.report.modules = len(self.forwards)
        self._log()
        return self.report

    def _store_weights(self, modules: dict[str, nn.Module]) -> set[int]:
        seen: set[int] = set()
        r = self.report
        for name, m in modules.items():
            p = m.weight
            if id(p) in seen:
                continue  # a tied weight: converted once
            seen.add(id(p))
            pname = name + ".weight"
            if p.dtype != self.dtype:
                original = p.dtype
                low = p.data.to(self.dtype)
                if original.itemsize > low.itemsize and not torch.equal(low.to(original), p.data):
                    r.rounded.append(pname)
                _set_dtype_(p, self.dtype)
                del low
                self.converted.append(Converted(pname, p, original))
            r.stored.append(pname)
            r.stored_numel += p.numel()
            r.stored_bytes += p.numel() * p.element_size()
        return seen

    def _widen_the_rest(self, stored: set[int]) -> None:
        for name, p in self.model.named_parameters():
            if id(p) in stored or p.dtype not in SIXTEEN:
                continue
            original = p.dtype
            _set_dtype_(p, torch.float32)
            self.converted.append(Converted(name, p, original))
            self.report.widened.append(name)
        for mod_name, mod in self.model.named_modules():
            for attr, b in list(mod._buffers.items()):
                if b is None or b.dtype not in SIXTEEN:
                    continue
                mod._buffers[attr] = b.float()
                self.converted.append(Converted(f"{mod_name}.{attr}" if mod_name else attr, b, b.dtype, mod, attr))
                self.report.widened.append(f"{mod_name}.{attr}")

    def _log(self) -> None:
        r = self.report
        logger.info("hf_memkit: precision.bf16: %d weights (%.1f MiB) stored in %s; %d tensors widened to fp32%s",
                    len(r.stored), r.stored_bytes / 2**20, str(self.dtype).replace("torch.", ""), len(r.widened),
                    f"; kept fp32: {', '.join(r.kept[:4])}" if r.kept else "")
        if r.rounded:
            logger.info("hf_memkit: precision.bf16: %d of %d weights held values %s cannot represent and were "
                        "rounded to nearest (e.g. %s); remove() restores the rounded values, not the originals. "
                        "Load the checkpoint with dtype=%s to start from the stored values",
                        len(r.rounded), len(r.stored), str(self.dtype).replace("torch.", ""),
                        ", ".join(r.rounded[:3]), self.dtype)

    def remove(self) -> None:
        self.patches.remove()
        self.forwards = []
        for c in reversed(self.converted):
            if c.owner is not None:
                c.owner._buffers[c.attr] = c.tensor  # the original buffer object, never modified
            else:
                _set_dtype_(c.tensor, c.original)
        self.converted = []
        restore, self._kernels = self._kernels, None
        if restore is not None:
            restore()
