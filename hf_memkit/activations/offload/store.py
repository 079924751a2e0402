"""Where offloaded tensors live: host RAM (CUDA tensors, pinned buffers filled on a side stream) or files on disk
(any device; one file per tensor, written with plain ``write`` so the process keeps no mapping of it, read back
into a fresh buffer in backward). A stored entry frees its file when autograd drops the saved tensor (after
backward, or when the graph is discarded); the store's folder is removed by the technique's ``remove()``.

Values and strides are preserved, so unpacked tensors are bit-identical and backward runs the same kernels.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import weakref
from typing import Any

import torch


def is_dense_block(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory, in some dimension order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory block as a 1-D tensor (a copy only when it is not dense)."""
    if not is_dense_block(t):
        t = t.contiguous()
    return t.as_strided((t.numel(),), (1,), t.storage_offset()), t.stride()


class _DiskEntry:
    __slots__ = ("path", "shape", "stride", "dtype", "device", "nbytes", "__weakref__")


class DiskStore:
    """Saved tensors as files in a private temporary folder. The folder exists only while tensors are written
    (made at the first ``put``), goes at ``release()``/``close()`` (the end of training) and, whatever happens,
    when the process exits: a run never leaves an empty ``memkit-offload-*`` folder behind."""

    def __init__(self, folder: str | None = None):
        self.parent = folder
        self.folder: str | None = None
        self._remove_at_exit: Any = None
        self._ids = itertools.count()
        self.bytes_written = 0

    def _ensure_folder(self) -> str:
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="memkit-offload-", dir=self.parent)
            self._remove_at_exit = weakref.finalize(self, shutil.rmtree, self.folder, True)
        return self.folder

    def put(self, t: torch.Tensor) -> _DiskEntry:
        flat, stride = _flat(t.detach())
        flat = flat.cpu()
        e = _DiskEntry()
        e.path = os.path.join(self._ensure_folder(), f"{next(self._ids)}.bin")
        e.shape, e.stride, e.dtype, e.device = tuple(t.shape), stride, t.dtype, t.device
        raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
        e.nbytes = raw.numel()
        with open(e.path, "wb") as f:
            f.write(memoryview(raw.numpy()))
        self.bytes_written += e.nbytes
        weakref.finalize(e, _unlink, e.path)
        return e

    def get(self, e: _DiskEntry) -> torch.Tensor:
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        with open(e.path, "rb") as f:
            f.readinto(memoryview(buf.numpy()))
        out = buf.view(e.dtype).as_strided(e.shape, e.stride)
        return out.to(e.device) if e.device.type != "cpu" else out

    def files(self) -> list[str]:
        return sorted(os.listdir(self.folder)) if self.folder and os.path.isdir(self.folder) else []

    def release(self) -> None:
        """Remove the folder (the next ``put`` makes a new one)."""
        if self._remove_at_exit is not None:
            self._remove_at_exit()  # rmtree now, and no longer at exit
        self.folder = self._remove_at_exit = None

    def close(self) -> None:
        self.release()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _HostEntry:
    __slots__ = ("host", "device")


class HostStore:
    """CUDA -> pinned host RAM on a side stream. The device tensor is marked as used by the side stream
    (``record_stream``), so the allocator reuses its memory only after the copy finished; backward copies back on
    the same stream (ordered after the copy out) and the compute stream waits for it."""

    def __init__(self, pin_memory: bool = True):
        self.pin_memory = pin_memory
        self.streams: dict[Any, Any] = {}
        self.bytes_written = 0

    def _stream(self, device: torch.device):
        s = self.streams.get(device)
        if s is None:
            s = self.streams[device] = torch.cuda.Stream(device)
        return s

    def put(self, t: torch.Tensor) -> _HostEntry:
        src = t.detach() if is_dense_block(t) else t.detach().contiguous()
        side, cur = self._stream(t.device), torch.cuda.current_stream(t.device)
        side.wait_stream(cur)
        e = _HostEntry()
        e.device = t.device
        with torch.cuda.stream(side):
            e.host = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device="cpu",
                                         pin_memory=self.pin_memory)
            e.host.copy_(src, non_blocking=self.pin_memory)
        src.record_stream(side)
        self.bytes_written += src.numel() * src.element_size()
        return e

    def get(self, e: _HostEntry) -> torch.Tensor:
        side, cur = self._stream(e.device), torch.cuda.current_stream(e.device)
        with torch.cuda.stream(side):
            out = e.host.to(e.device, non_blocking=self.pin_memory)
        cur.wait_stream(side)
        out.record_stream(cur)
        return out

    def release(self) -> None:
        """Nothing to remove: host buffers go with their saved tensors."""

    def close(self) -> None:
        self.streams.clear()
