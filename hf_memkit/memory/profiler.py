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
* ``torch.cuda.max_memory_allocated`` on CUDA, and the process's peak RSS;
* the process as a whole (:meth:`MemoryReportCallback.process_report`): a phase-labelled RSS timeline
  (:mod:`hf_memkit.memory.process`), one profiled warm step and evaluation batch (:mod:`hf_memkit.memory.peak`),
  and the peak RSS split into runtime, tensors by category, transients, allocator slack and unaccounted.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Iterator

from transformers import TrainerCallback

from . import process
from .peak import RegionProfiler, Tag, analyze
from .tags import is_parameter_gradient


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM`` on Linux; ``ru_maxrss`` elsewhere)."""
    return process.peak_rss_bytes()


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
        #: storage pointers counted per category (the profiled step tags the blocks alive at its peak with them)
        self.pointers: dict[str, set[int]] = {"activations": set(), "logits": set()}
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
        self.pointers[cat].add(k[0])

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
        self.pointers = {"activations": set(), "logits": set()}
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


def _tensor_ptrs(tensors: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None and t.device.type != "meta"}


def _optimizer_tensors(optimizer: Any) -> list[Any]:
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    return [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def weight_split(model: Any) -> dict[str, Any]:
    """Base weights (+ buffers) by where their storage lives: ``weights_file_mapped`` (pages of a mapped
    safetensors file, never seen by the allocator), ``weights_allocator``, and the mapped ``files``."""
    named = list(model.named_parameters())
    split = process.file_mapped([p for n, p in named if not is_adapter_parameter(n)] + list(model.buffers()))
    return {"weights_file_mapped": split["file_mapped"], "weights_allocator": split["allocator"],
            "files": sorted(split["files"])}


#: the breakdown of the process peak, in display order (they sum to ``peak_rss_bytes`` exactly)
BREAKDOWN = ("runtime", "weights", "adapter_weights", "optimizer_states", "gradients", "activations", "logits",
             "transients", "slack", "unaccounted")


def process_breakdown(peak: int, runtime: int, tensors: dict[str, int], slack: int) -> dict[str, int]:
    """``runtime`` + the tensor categories alive at the peak (``transients`` among them) + ``slack`` +
    ``unaccounted`` (the rest, may be negative) = ``peak``, exactly."""
    out = {"runtime": int(runtime)}
    for k in BREAKDOWN[1:-2]:
        out[k] = int(tensors.get(k, 0))
    for k, v in tensors.items():  # technique-specific categories the accounting saw
        if k not in out:
            out[k] = int(v)
    out["slack"] = int(slack)
    out["unaccounted"] = int(peak) - sum(out.values())
    return out


class MemoryReportCallback(TrainerCallback):
    """Per optimizer step: parameter, gradient, optimizer-state and saved-activation bytes, peak RSS, CUDA peak,
    step time. The maxima go to :meth:`report`, every step to :attr:`timeline`. And the process as a whole:

    * an RSS sampler (:mod:`hf_memkit.memory.process`) labelled with phases: this callback marks ``forward``
      (the loss computation), ``backward`` (from the loss to the optimizer), ``optimizer`` (the step), ``train``
      (the loop around them) and ``eval`` (evaluation batches, until ``on_evaluate``); ``memkit train`` marks
      ``load``, ``build`` and ``save`` with :func:`hf_memkit.memory.process.mark`;
    * one warm step profiled with the allocator's events (:mod:`hf_memkit.memory.peak`, ``profile_step``:
      default the 2nd optimizer step; 0 or None: off) and the first evaluation batch (``profile_eval``): the live
      tensor bytes over the step, their peak, its phase, and what was alive then;
    * :meth:`report` ``["process"]``: the process peak split into ``runtime``, tensor categories, ``transients``,
      ``slack`` and ``unaccounted`` (see :meth:`process_report`).

    ``runtime``: the process's RSS before the model loaded (bytes, or a :func:`hf_memkit.memory.process.snapshot`
    taken then); by default the snapshot of the process sampler's first ``load`` mark.

    The saved-activation meter needs to see the loss computation, which callbacks cannot: the trainer wiring
    enters :meth:`memkit_loss_context` around every ``compute_loss`` of a trainer it is attached to.
    """

    def __init__(self, profile_step: int | None = 2, profile_eval: bool = True, sample: bool = True,
                 runtime: "int | dict[str, Any] | None" = None) -> None:
        self.measured: dict[str, int] = {}
        self.timeline: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []
        self.profile_step = profile_step or 0
        self.profile_eval = profile_eval
        self.sample = sample
        self.runtime = runtime
        self.peak_step: dict[str, Any] | None = None
        self.eval_batch: dict[str, Any] | None = None
        self._meter: SavedTensorMeter | None = None
        self._step_saved = {"activations": 0, "logits": 0}
        self._t0 = 0.0
        self._region: RegionProfiler | None = None  # the profiled step, while it runs
        self._ctx: dict[str, Any] = {}
        self._before_eval: str | None = None
        self._train_begin: dict[str, Any] | None = None
        self._weights: dict[str, Any] | None = None

    def set_runtime(self, runtime: "int | dict[str, Any]") -> None:
        """The process's RSS before the model loaded (bytes or a snapshot dict)."""
        self.runtime = runtime

    # -- phases
    def _switch(self, phase: str) -> None:
        if self.sample:
            process.mark(phase)
        if self._region is not None:
            self._region.phase(phase)

    # the wiring calls this around compute_loss (training and evaluation)
    @contextlib.contextmanager
    def memkit_loss_context(self, model: Any) -> Iterator[None]:
        if not model.training:
            with self._eval_batch(model):
                yield
            return
        if self._meter is None or self._meter.model is not model:
            config = getattr(model, "config", None)
            self._meter = SavedTensorMeter(model, getattr(config, "vocab_size", None))
        self._switch("forward")
        with self._meter.measure():
            yield
        self._switch("backward")
        for k, v in self._meter.bytes.items():  # micro-batches of one step: the largest is the peak
            self._step_saved[k] = max(self._step_saved[k], v)
        if self._region is not None:
            for k, ptrs in self._meter.pointers.items():
                self._ctx.setdefault(k, set()).update(ptrs)

    @contextlib.contextmanager
    def _eval_batch(self, model: Any) -> Iterator[None]:
        if self.sample and process.current_phase() != "eval":
            self._before_eval = process.current_phase()
            process.mark("eval")
        if not (self.profile_eval and self.eval_batch is None and self._region is None):
            yield
            return
        base = self._base_counts(model, None)
        region = RegionProfiler()
        try:
            region.start("eval")
        except Exception:  # pragma: no cover - a profiler that cannot start must not stop evaluation
            self.profile_eval = False
            yield
            return
        ok = False
        try:
            yield
            ok = True
        finally:
            if ok:
                if self.sample:
                    process.mark("profile")
                from .host_memory import collect

                collect()
                w = region.stop()
                self.eval_batch = self._finish(w, base, [], region)
                del w
                collect()
                if self.sample:
                    process.mark("eval")
            else:
                region.abandon()

    # -- tensor accounting at the start of a profiled region
    def _base_counts(self, model: Any, optimizer: Any) -> dict[str, int]:
        """Host (CPU) tensor bytes by category now: what the process's RSS holds of them (on CUDA, the device's
        tensors are the CUDA analysis's ``base``, ``torch.cuda.memory_allocated``)."""
        if self._weights is None:
            self._weights = weight_split(model)

        def host(tensors: Any) -> int:
            return storage_bytes(t for t in tensors if t is not None and t.device.type == "cpu")

        named = list(model.named_parameters())
        opt = (host(_optimizer_tensors(optimizer)) if optimizer is not None
               else self.measured.get("optimizer_states", 0))
        return {"weights": host([p for n, p in named if not is_adapter_parameter(n)] + list(model.buffers())),
                "adapter_weights": host(p for n, p in named if is_adapter_parameter(n)),
                "weights_file_mapped": self._weights["weights_file_mapped"],
                "gradients": host(p.grad for _, p in named),
                "optimizer_states": opt}

    def _finish(self, w: Any, base: dict[str, int], tags: list[Tag], region: RegionProfiler) -> dict[str, Any]:
        owned = sum(v for k, v in base.items() if k not in ("weights_file_mapped",)) - base["weights_file_mapped"]
        t = time.perf_counter()
        out = analyze(w, "cpu", owned, tags)
        out["base"] = base
        out["tensor_peak_bytes"] = out["peak_bytes"] + base["weights_file_mapped"]  # with the mapped weights
        out["profile_seconds"] = round(region.seconds, 3)
        out["analysis_seconds"] = round(region.parse_seconds + time.perf_counter() - t, 3)
        try:
            import torch

            if torch.cuda.is_available() and "cuda" in w.blocks:
                out["cuda"] = analyze(w, "cuda", self._ctx.get("cuda_base", 0), tags)
                out["cuda"].pop("timeline", None)
        except Exception:  # pragma: no cover
            pass
        return out

    def _bump(self, key: str, value: int) -> None:
        self.measured[key] = max(self.measured.get(key, 0), value)

    # -- trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.sample:
            process.mark("train")
        if model is not None:
            counts = self._base_counts(model, None)
            self._train_begin = {**process.snapshot(), "tensors": counts}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._t0 = time.perf_counter()
        self._step_saved = {"activations": 0, "logits": 0}
        if self.sample:
            process.mark("train")
        if (self.profile_step and self.peak_step is None and self._region is None and model is not None
                and state.global_step + 1 == self.profile_step):
            self._ctx = {"base": self._base_counts(model, optimizer)}
            try:
                import torch

                if torch.cuda.is_available():
                    self._ctx["cuda_base"] = torch.cuda.memory_allocated()
            except Exception:  # pragma: no cover
                pass
            self._region = RegionProfiler()
            try:
                self._region.start("train")
            except Exception:  # pragma: no cover - never stop training for the measurement
                self._region = None
                self.profile_step = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._bump("gradients", gradient_bytes(model))
            if self._region is not None:
                self._ctx["gradients"] = _tensor_ptrs(p.grad for p in model.parameters())
        self._switch("optimizer")

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None:
            self._bump("optimizer_states", optimizer_state_bytes(optimizer))
            if self._region is not None:
                self._ctx["optimizer_states"] = _tensor_ptrs(_optimizer_tensors(optimizer))
        self._switch("train")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._t0)
        if self._region is not None:
            region, self._region = self._region, None
            from .host_memory import collect

            # what the step freed goes back first, so the analysis reuses it rather than adding to the peak (held
            # until the end of the run instead, the profiler's events cost more than their analysis: measured
            # 1,242-1,264 MiB against 1,112-1,128 on SmolLM2's default recipe)
            collect()
            if self.sample:  # the profiler's results and their analysis take memory too: label it
                process.mark("profile")
            w = region.stop()
            ctx = self._ctx
            tags = [Tag("gradients", ctx.get("gradients", set()), ("start", "optimizer")),
                    Tag("logits", ctx.get("logits", set()), ("end", "forward")),
                    Tag("activations", ctx.get("activations", set()), ("end", "forward")),
                    Tag("optimizer_states", ctx.get("optimizer_states", set()), ("end", "optimizer"))]
            self.peak_step = {"step": state.global_step, **self._finish(w, ctx["base"], tags, region)}
            self.peak_step["step_seconds"] = round(self.step_seconds[-1], 3)
            self._ctx = {}
            del w, region
            collect()
            if self.sample:
                process.mark("train")
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

    def on_evaluate(self, args, state, control, **kwargs):
        if self.sample and process.current_phase() == "eval":
            process.mark(self._before_eval or "train")

    def on_train_end(self, args, state, control, **kwargs):
        self.memkit_abort()

    def memkit_abort(self) -> None:
        """The run stopped inside the profiled step: stop the profiler without analysing it."""
        if self._region is not None:
            self._region.abandon()
            self._region = None
            self._ctx = {}

    # -- the report
    def report(self) -> dict[str, Any]:
        cats = ("weights", "adapter_weights", "gradients", "optimizer_states", "activations", "logits")
        out: dict[str, Any] = {k: self.measured.get(k, 0) for k in cats}
        out["total_bytes"] = sum(out.values())
        for k in ("peak_rss_bytes", "cuda_max_allocated_bytes"):
            if k in self.measured:
                out[k] = self.measured[k]
        out["peak_rss_bytes"] = max(out.get("peak_rss_bytes", 0), peak_rss_bytes())
        if self.step_seconds:
            out["median_step_seconds"] = round(statistics.median(self.step_seconds), 4)
        out["timeline"] = self.timeline
        try:
            out["process"] = self.process_report()
        except Exception as exc:  # pragma: no cover - the report must not fail for its newest part
            out["process"] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    def _runtime_base(self) -> dict[str, Any]:
        """The process before the model: rss, rss_file, allocator figures and where they come from."""
        rt = self.runtime
        if isinstance(rt, dict):
            return {**rt, "source": rt.get("source", "given")}
        if isinstance(rt, (int, float)) and not isinstance(rt, bool):
            return {"rss_bytes": int(rt), "source": "given"}
        s = process.sampler()
        snap = s.first_mark("load") if s is not None else None
        if snap is not None:
            return {**snap, "source": "load mark"}
        if self._train_begin is not None:  # no mark before the model: what train begin held, minus its tensors
            tb = self._train_begin
            tensors = tb["tensors"]
            held = tensors["weights"] + tensors["adapter_weights"] + tensors["gradients"]
            return {"rss_bytes": tb["rss_bytes"] - held,
                    "rss_file_bytes": tb["rss_file_bytes"] - tensors["weights_file_mapped"],
                    "allocator": tb.get("allocator"), "source": "train begin minus its tensors (approximate)"}
        return {"rss_bytes": 0, "source": "unknown"}

    def process_report(self) -> dict[str, Any]:
        """The process peak split (bytes; they sum to ``peak_rss_bytes`` exactly):

        * ``runtime``: the RSS before the model loaded (:attr:`runtime`), plus the growth of resident *library*
          file pages since (resident file pages at the peak minus then, minus the weights' resident file pages;
          negative when pages were handed back, e.g. ``host_memory.page_out_libraries``);
        * ``weights`` (all, file-mapped ones included), ``adapter_weights``, ``optimizer_states``: counted when
          the profiled region began; ``gradients``, ``activations``, ``logits``: those plus the blocks of the
          profiled region alive at its peak, by category (:mod:`hf_memkit.memory.peak`);
        * ``transients``: the region's other blocks alive at its peak (loss buffers, recomputed layers, the
          optimizer's temporaries...). The region is the profiled evaluation batch when the RSS peaked in
          ``eval``, else the profiled training step; with neither, the measured maxima and no transients;
        * ``slack``: what the allocator kept after frees, at the RSS peak, minus what it kept before the model
          loaded: glibc ``free_bytes`` (``mallinfo2().fordblks``); mimalloc: committed growth minus the
          allocator-owned live tensor bytes at the peak (an estimate: mimalloc release builds do not count bytes
          in use); 0 elsewhere;
        * ``unaccounted``: ``peak - everything above``: Python objects, tokenizer, thread stacks, the missed part
          of a spike the sampler did not see (``peak_rss_bytes`` is the kernel's ``VmHWM``).
        """
        peak = peak_rss_bytes()
        s = process.sampler()
        timeline = s.timeline() if s is not None else None
        at = dict((timeline or {}).get("peak") or {})
        base = self._runtime_base()
        weights = self._weights or {"weights_file_mapped": 0, "files": []}
        resident = process.mapping_resident(weights.get("files", []))
        # runtime: RSS before the model + the library file pages that came (or went) since
        file_growth = 0
        if at.get("rss_file_bytes") is not None and base.get("rss_file_bytes") is not None:
            file_growth = at["rss_file_bytes"] - base["rss_file_bytes"] - (resident["rss"] - resident["anonymous"])
        runtime = int(base.get("rss_bytes", 0)) + int(file_growth)
        # the tensors alive at the peak
        region_name, region = None, None
        if at.get("phase") == "eval" and self.eval_batch is not None:
            region_name, region = "eval_batch", self.eval_batch
        elif self.peak_step is not None:
            region_name, region = "peak_step", self.peak_step
        elif self.eval_batch is not None:
            region_name, region = "eval_batch", self.eval_batch
        if region is not None:
            b = region["base"]
            tensors = {"weights": b["weights"], "adapter_weights": b["adapter_weights"],
                       "optimizer_states": b["optimizer_states"], "gradients": b["gradients"]}
            train_mark = s.first_mark("train") if s is not None else None
            if region_name == "eval_batch" and train_mark is not None and at.get("t", 0) > train_mark["t"]:
                # an evaluation after training began: the optimizer state exists by then
                tensors["optimizer_states"] = max(b["optimizer_states"], self.measured.get("optimizer_states", 0))
            for k, v in region["at_peak"].items():
                tensors[k] = tensors.get(k, 0) + v
            live_owned = region["peak_bytes"] + (tensors["optimizer_states"] - b["optimizer_states"])
        else:
            tensors = {k: self.measured.get(k, 0) for k in
                       ("weights", "adapter_weights", "optimizer_states", "gradients", "activations", "logits")}
            live_owned = sum(tensors.values()) - weights["weights_file_mapped"]
        # slack
        alloc, alloc0 = at.get("allocator") or {}, base.get("allocator") or {}
        slack, slack_note = 0, "allocator not readable"
        if alloc.get("allocator") == "glibc":
            slack = alloc["free_bytes"] - (alloc0.get("free_bytes") or 0)
            slack_note = "glibc mallinfo2 fordblks at the RSS peak minus before the model"
        elif alloc.get("allocator") == "mimalloc":
            slack = max(0, alloc["committed_bytes"] - (alloc0.get("committed_bytes") or 0) - live_owned)
            slack_note = "mimalloc committed growth minus the allocator-owned live tensor bytes (estimate)"
        parts = process_breakdown(peak, runtime, tensors, slack)
        anon_growth = None
        if at.get("rss_bytes") is not None and base.get("rss_anon_bytes") is not None:
            anon_growth = at["rss_bytes"] - at.get("rss_file_bytes", 0) - base["rss_anon_bytes"]
        out: dict[str, Any] = {
            "peak_rss_bytes": peak,
            "sampled_peak": at,
            "peak_phase": at.get("phase"),
            # "profile": the peak came from this measurement's own analysis of the profiled region
            "instrumentation_peak": at.get("phase") == "profile",
            "breakdown": parts,
            "unaccounted_fraction": round(parts["unaccounted"] / peak, 4) if peak else None,
            "tensors_from": region_name or "measured maxima",
            "runtime": {"before_model": base, "library_file_growth_bytes": int(file_growth),
                        "weights_resident_bytes": resident["rss"], "weights_cow_bytes": resident["anonymous"]},
            "weights_file_mapped_bytes": weights["weights_file_mapped"],
            "slack_source": slack_note,
            # anonymous RSS growth since before the model minus the allocator-owned live tensors at the peak: no
            # allocator can keep more resident than this (mimalloc's committed figure may exceed it)
            "slack_upper_bound_bytes": (anon_growth - live_owned) if anon_growth is not None else None,
            "allocator": process.allocator_info(),
        }
        if self.peak_step is not None:
            out["peak_step"] = self.peak_step
        if self.eval_batch is not None:
            out["eval_batch"] = self.eval_batch
        if timeline is not None:
            out["rss_timeline"] = timeline
        return out
