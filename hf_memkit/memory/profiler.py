"""Measured memory during a Trainer run, by tensor accounting (parameters, gradients, optimizer state) and the
process's peak RSS. Shared storages (tied weights) are counted once."""

from __future__ import annotations

import resource
import sys
from typing import Any

from transformers import TrainerCallback


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def parameter_bytes(model: Any) -> dict[str, int]:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    return {"weights": _storage_bytes(frozen) + _storage_bytes(trainable) + _storage_bytes(model.buffers()),
            "trainable_weights": _storage_bytes(trainable)}


def gradient_bytes(model: Any) -> int:
    return _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: Any) -> int:
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    tensors = [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return _storage_bytes(tensors)


class MemoryReportCallback(TrainerCallback):
    """Records, per optimizer step, gradient and optimizer-state bytes and peak RSS; keeps the maxima."""

    def __init__(self) -> None:
        self.measured: dict[str, int] = {}
        self.timeline: list[dict[str, int]] = []

    def _bump(self, key: str, value: int) -> None:
        self.measured[key] = max(self.measured.get(key, 0), value)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._bump("gradients", gradient_bytes(model))

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None:
            self._bump("optimizer_states", optimizer_state_bytes(optimizer))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            for k, v in parameter_bytes(model).items():
                self._bump(k, v)
        rss = peak_rss_bytes()
        self._bump("peak_rss_bytes", rss)
        self.timeline.append({"step": state.global_step, "peak_rss_bytes": rss,
                              "gradients": self.measured.get("gradients", 0),
                              "optimizer_states": self.measured.get("optimizer_states", 0)})

    def report(self) -> dict[str, Any]:
        out = {k: v for k, v in self.measured.items() if k != "trainable_weights"}
        out["total_bytes"] = sum(v for k, v in out.items() if k in ("weights", "gradients", "optimizer_states"))
        out["trainable_weights"] = self.measured.get("trainable_weights", 0)
        return out
