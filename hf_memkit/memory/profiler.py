"""Measured memory during a Trainer run.

* parameter, gradient and optimizer-state bytes by tensor accounting (each storage counted once, so tied
  weights and views are not double counted);
* saved-activation bytes: every tensor autograd saves for backward during the loss computation, seen through
  ``torch.autograd.graph.saved_tensors_hooks``; storages of parameters and buffers are excluded, and so are
  parameter gradients a fused op forms in its forward (``memory/tags.py``: their storage becomes ``.grad``, which
  the gradient accounting counts); shared storages are counted once, tensors whose last dimension is the
  vocabulary go to ``logits``. Under gradient
  checkpointing the checkpointed layers' inputs (what the checkpoint keeps) are counted instead of their
  internals, which are recomputed in backward;
* ``torch.cuda.max_memory_allocated`` on CUDA, and the process's peak RSS.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from typing import Any, Iterator

from transformers import TrainerCallback

from .tags import is_parameter_gradient


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _key(t: Any) -> tuple[int, str]:
    return t.untyped_storage().data_ptr(), str(t.device)


def storage_bytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        k = _key(t)
        if k in seen:
            continue
        seen.add(k)
        total += t.untyped_storage().nbytes()
    return total


def is_adapter_parameter(name: str) -> bool:
    return "lora_" in name or ".lorc_" in name  # PEFT LoRA, MixLoRA (mixlora_*), LoRC adapter (lorc_A/B)


def parameter_bytes(model: Any) -> dict[str, int]:
    """``weights`` (base parameters in their storage format, plus buffers) and ``adapter_weights``."""
    named = list(model.named_parameters())
    return {
        "weights": storage_bytes([p for n, p in named if not is_adapter_parameter(n)] + list(model.buffers())),
        "adapter_weights": storage_bytes([p for n, p in named if is_adapter_parameter(n)]),
    }


def gradient_bytes(model: Any) -> int:
    return storage_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: Any) -> int:
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    tensors = [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return storage_bytes(tensors)


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward while the context is active.

    ``vocab_size`` routes tensors whose last dimension equals it to ``logits``. The meter keeps no reference to
    any tensor (only storage pointers and sizes), so it changes nothing about when memory is freed.
    """

    def __init__(self, model: Any, vocab_size: int | None = None):
        self.model = model
        self.vocab_size = vocab_size
        self.bytes = {"activations": 0, "logits": 0}
        self._seen: set[tuple[int, str]] = set()
        self._exclude: set[tuple[int, str]] = set()

    def _count(self, t: Any) -> None:
        import torch

        if t.device.type == "meta" or t.layout != torch.strided:
            return
        k = _key(t)
        if k in self._seen or k in self._exclude or is_parameter_gradient(t):
            return  # a parameter's gradient formed early (memory/tags.py) is counted under gradients
        self._seen.add(k)
        cat = "logits" if self.vocab_size and t.dim() >= 1 and t.shape[-1] == self.vocab_size else "activations"
        self.bytes[cat] += t.untyped_storage().nbytes()

    def _pack(self, t: Any) -> Any:
        self._count(t)
        return t

    def _checkpoint_inputs(self, module: Any, args: tuple, kwargs: dict) -> None:
        import torch

        if module.training and getattr(module, "gradient_checkpointing", False):
            todo = [*args, *kwargs.values()]
            while todo:  # the checkpoint keeps every tensor argument, also inside tuples (RoPE cos/sin)
                a = todo.pop()
                if isinstance(a, (tuple, list)):
                    todo.extend(a)
                elif isinstance(a, torch.Tensor) and a.is_floating_point():
                    self._count(a)

    @contextlib.contextmanager
    def measure(self) -> Iterator["SavedTensorMeter"]:
        import torch

        self._exclude = {_key(p) for p in self.model.parameters()} | {_key(b) for b in self.model.buffers()}
        self._seen = set()
        self.bytes = {"activations": 0, "logits": 0}
        handles = [
            m.register_forward_pre_hook(self._checkpoint_inputs, with_kwargs=True)
            for m in self.model.modules() if hasattr(m, "gradient_checkpointing") and hasattr(m, "_gradient_checkpointing_func")
        ]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()


class MemoryReportCallback(TrainerCallback):
    """Per optimizer step: parameter, gradient, optimizer-state and saved-activation bytes, peak RSS, CUDA peak,
    step time. The maxima go to :meth:`report`, every step to :attr:`timeline`.

    The saved-activation meter needs to see the loss computation, which callbacks cannot: the trainer wiring
    enters :meth:`memkit_loss_context` around every ``compute_loss`` of a trainer it is attached to.
    """

    def __init__(self) -> None:
        self.measured: dict[str, int] = {}
        self.timeline: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []
        self._meter: SavedTensorMeter | None = None
        self._step_saved = {"activations": 0, "logits": 0}
        self._t0 = 0.0

    # the wiring calls this around compute_loss (training only)
    @contextlib.contextmanager
    def memkit_loss_context(self, model: Any) -> Iterator[None]:
        if not model.training:
            yield
            return
        if self._meter is None or self._meter.model is not model:
            config = getattr(model, "config", None)
            self._meter = SavedTensorMeter(model, getattr(config, "vocab_size", None))
        with self._meter.measure():
            yield
        for k, v in self._meter.bytes.items():  # micro-batches of one step: the largest is the peak
            self._step_saved[k] = max(self._step_saved[k], v)

    def _bump(self, key: str, value: int) -> None:
        self.measured[key] = max(self.measured.get(key, 0), value)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._step_saved = {"activations": 0, "logits": 0}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._bump("gradients", gradient_bytes(model))

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None:
            self._bump("optimizer_states", optimizer_state_bytes(optimizer))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._t0)
        if model is not None:
            for k, v in parameter_bytes(model).items():
                self._bump(k, v)
        for k, v in self._step_saved.items():
            self._bump(k, v)
        rss = peak_rss_bytes()
        self._bump("peak_rss_bytes", rss)
        entry = {"step": state.global_step, "seconds": round(self.step_seconds[-1], 4), "peak_rss_bytes": rss,
                 **self._step_saved}
        try:
            import torch

            if torch.cuda.is_available():
                entry["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
                self._bump("cuda_max_allocated_bytes", entry["cuda_max_allocated_bytes"])
        except Exception:  # pragma: no cover - CUDA query failures must not stop training
            pass
        self.timeline.append(entry)

    def report(self) -> dict[str, Any]:
        cats = ("weights", "adapter_weights", "gradients", "optimizer_states", "activations", "logits")
        out: dict[str, Any] = {k: self.measured.get(k, 0) for k in cats}
        out["total_bytes"] = sum(out.values())
        for k in ("peak_rss_bytes", "cuda_max_allocated_bytes"):
            if k in self.measured:
                out[k] = self.measured[k]
        if self.step_seconds:
            out["median_step_seconds"] = round(statistics.median(self.step_seconds), 4)
        out["timeline"] = self.timeline
        return out
