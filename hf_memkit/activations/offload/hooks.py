"""The saved-tensor hooks. :class:`OffloadHooks` is pushed around the model's forward (forward pre-hook / forward
hook with ``always_call``): every tensor autograd saves of at least ``min_bytes`` that is not a parameter or
buffer goes to the store; the others are handed to whatever hooks were active outside (the memory profiler's
meter, another technique) or kept as they are. :class:`TokenFrame` is pushed around one decoder layer for the
token-wise variant.

Token-wise (MEMO): for every tensor the layer saves with a token axis (an axis of the layer input's sequence
length, or the flattened batch·sequence rows), only the first ⌈α·L⌉ token rows are stored; the rest are dropped.
In backward, the first unpack of the layer re-runs the *whole layer* once from its kept input (with the forward's
RNG state, gradients recorded on detached inputs, every saved tensor captured in order) and each tensor is
rebuilt from its stored rows and the recomputed remainder. MEMO's row-restricted recompute needs per-op kernels
(attention rows need all keys and values); here the recompute costs one layer forward, as gradient
checkpointing does, and α trades host RAM / transfer volume against nothing else. Tensors without a token axis
are stored whole. The layer input stays where it is (on the device), as with checkpointing.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from ...integrations.kv_cache import is_kv_cache
from .store import is_dense_block


def _outer_hooks():
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


class _Chain:
    """Delegates a tensor to the hooks that were active when ours were pushed (or keeps it)."""

    def __init__(self):
        self.outer = _outer_hooks()

    def pack(self, t: torch.Tensor) -> Any:
        if self.outer is None:
            return ("keep", t)
        pack, unpack = self.outer
        return ("outer", unpack, pack(t))

    @staticmethod
    def unpack(obj: Any) -> torch.Tensor:
        return obj[1] if obj[0] == "keep" else obj[1](obj[2])


class _Alias:
    """Another view (shape, stride) of a block already stored this forward."""

    __slots__ = ("entry", "shape", "stride")

    def __init__(self, entry: Any, shape: tuple, stride: tuple):
        self.entry, self.shape, self.stride = entry, shape, stride


class OffloadHooks:
    def __init__(self, store: Any, min_bytes: int, device_types: set[str] | None, excluded: set[int]):
        self.store, self.min_bytes, self.device_types, self.excluded = store, min_bytes, device_types, excluded
        self._ctx = None
        self._chain: _Chain | None = None
        self.offloaded_bytes = 0
        #: the same memory saved by several ops is stored once per forward: q/k/v read one input, and each
        #: Linear saves its own 2-D view of it. Keyed by the memory block (start, extent, dtype) and version,
        #: confirmed by the identity of the tensor that owns the memory (the view's ``_base``): a freed tensor's
        #: weak reference is dead, so new memory at the same address never matches. A hit with another shape or
        #: stride is an :class:`_Alias` of the stored block.
        self._seen: dict[tuple, tuple[Any, Any, tuple]] = {}  # key -> (weakref to owner, entry, first view)

    def wants(self, t: torch.Tensor) -> bool:
        if t.layout != torch.strided or t.device.type == "meta" or t.is_sparse:
            return False
        if self.device_types is not None and t.device.type not in self.device_types:
            return False
        if t.numel() * t.element_size() < self.min_bytes:
            return False
        return t.untyped_storage().data_ptr() not in self.excluded

    def put(self, t: torch.Tensor) -> Any:
        owner = t._base if t._base is not None else t
        view = (tuple(t.shape), t.stride())
        # a dense view is its block stored as is; any other is stored as a contiguous copy of exactly that view
        layout = (t.numel(),) if is_dense_block(t) else view
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), layout, t.dtype, t._version)
        hit = self._seen.get(key)
        if hit is not None and hit[0]() is owner:
            entry, first = hit[1], hit[2]
            return entry if view == first else _Alias(entry, *view)
        entry = self.store.put(t)
        self.offloaded_bytes += t.numel() * t.element_size()
        self._seen[key] = (weakref.ref(owner), entry, view)
        return entry

    def get(self, stored: Any) -> torch.Tensor:
        if isinstance(stored, _Alias):
            return self.store.get(stored.entry).as_strided(stored.shape, stored.stride)
        return self.store.get(stored)

    def pack(self, t: torch.Tensor) -> Any:
        if self.wants(t):
            return ("store", self.put(t))
        return self._chain.pack(t)

    def unpack(self, obj: Any) -> torch.Tensor:
        if obj[0] == "store":
            return self.get(obj[1])
        return _Chain.unpack(obj)

    def __enter__(self):
        self._chain = _Chain()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        ctx, self._ctx = self._ctx, None
        self._seen = {}
        ctx.__exit__(*exc)


def token_axis(t: torch.Tensor, batch: int, seq: int) -> tuple[int, int] | None:
    """(axis, length) of the token dimension of a tensor a layer saved, or None."""
    if t.dim() >= 2 and t.shape[0] == batch:
        for ax in range(1, t.dim()):
            if t.shape[ax] == seq:
                return ax, seq
    if t.dim() >= 1 and t.shape[0] == batch * seq and batch * seq > 1:
        return 0, batch * seq
    return None


class TokenFrame:
    """Saved-tensor hooks of one decoder-layer call in the token-wise variant (see the module docstring)."""

    def __init__(self, module: Any, args: tuple, kwargs: dict, hooks: OffloadHooks, fraction: float):
        self.module, self.args, self.kwargs, self.hooks, self.fraction = module, args, kwargs, hooks, fraction
        x = args[0] if args else kwargs.get("hidden_states")
        self.batch, self.seq = (x.shape[0], x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else (0, 0)
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(x.device) if isinstance(x, torch.Tensor) and x.is_cuda else None
        self.count = 0
        self.recomputed: list[torch.Tensor] | None = None
        self._chain: _Chain | None = None
        self._ctx = None

    def pack(self, t: torch.Tensor) -> Any:
        i = self.count
        self.count += 1
        if not self.hooks.wants(t):
            return ("chain", self._chain.pack(t))
        where = token_axis(t, self.batch, self.seq) if self.seq else None
        if where is None:
            return ("store", self.hooks.put(t))
        axis, length = where
        keep = min(length, math.ceil(self.fraction * length))
        part = self.hooks.store.put(t.narrow(axis, 0, keep)) if keep else None
        self.hooks.offloaded_bytes += (t.numel() // length) * keep * t.element_size()
        return ("tokens", self, i, axis, keep, part)

    @staticmethod
    def unpack(obj: Any) -> torch.Tensor:
        kind = obj[0]
        if kind == "chain":
            return _Chain.unpack(obj[1])
        _, frame, i, axis, keep, part = obj
        full = frame.recompute()[i]
        if part is None:
            return full
        out = full.clone()
        out.narrow(axis, 0, keep).copy_(frame.hooks.store.get(part))
        return out

    def recompute(self) -> list[torch.Tensor]:
        if self.recomputed is not None:
            return self.recomputed
        captured: list[torch.Tensor] = []

        def detach(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.detach().requires_grad_(v.requires_grad)
            if isinstance(v, tuple):
                return tuple(detach(a) for a in v)
            return v

        args = tuple(detach(a) for a in self.args)
        # no KV cache in the recompute: it would append this layer's keys/values a second time, and those (with
        # their graph and every tensor the recompute captured) would live as long as the cache does
        kwargs = {k: (None if is_kv_cache(k, v) else detach(v)) for k, v in self.kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        devices = [self.args[0].device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, devices[0])
            # captured detached: a captured tensor with a grad_fn would point back into the recompute graph,
            # whose saved-tensor hooks hold this list, a cycle through C++ that Python's GC cannot free (every
            # recomputed layer would stay alive until the process ends)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
                    lambda t: captured.append(t.detach()) or len(captured) - 1, lambda j: captured[j]):
                self.module.forward(*args, **kwargs)
        if len(captured) != self.count:
            raise RuntimeError(
                f"hf_memkit offload: recomputing {type(self.module).__name__} saved {len(captured)} tensors, the "
                f"forward saved {self.count}; the layer is not deterministic in what it saves — use "
                "token_fraction: 1"
            )
        self.recomputed = captured
        return captured

    def __enter__(self):
        self._chain = _Chain()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self._unpack)
        self._ctx.__enter__()
        return self

    def _unpack(self, obj: Any) -> torch.Tensor:
        if obj[0] == "store":
            return self.hooks.get(obj[1])
        return TokenFrame.unpack(obj)

    def __exit__(self, *exc):
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(*exc)
