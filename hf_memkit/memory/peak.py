"""The live tensor bytes of one profiled region (a warm training step, an evaluation batch), from the allocation
events PyTorch's allocators report to ``torch.profiler`` when ``profile_memory=True``.

How it is measured. Every allocation and free of the c10 CPU allocator (and the CUDA caching allocator) inside
``torch.profiler.profile(activities=[CPU (+ CUDA)], profile_memory=True)`` (driven here through the
``torch.autograd.profiler.profile`` it wraps) becomes an event with its pointer and
signed size (``kineto_results.experimental_event_tree()``). The events' own running total
(``total_allocated``) is not used: the CPU reporter keeps it across profiling sessions and never hears of frees
that happen while profiling is off, so it drifts. Instead allocations are paired with their frees by pointer,
which gives every block allocated in the window an interval ``[alloc, free)``; the live bytes at a time are the
bytes alive from *before* the window (``base_bytes``: what the caller counted, e.g. weights, adapter weights,
optimizer state) plus the window's blocks alive then. A free of a block allocated before the window is reported
at most once per process and not counted (``freed_before_bytes`` says how much). Phase markers are
``torch.profiler.record_function("memkit::<phase>")`` ranges; the peak's phase is the range that contains it.

What is *not* seen: memory-mapped weights (safetensors loaded with mmap are file pages, not allocations: the
callback counts them from tensor storage, see :func:`hf_memkit.memory.process.file_mapped`), Python objects,
and anything allocated with ``malloc`` outside PyTorch.

Categories at the peak. ``torch.profiler._memory_profiler`` would categorise blocks, but it refuses to run
without ``with_stack=True`` and ``record_shapes=True`` (``_memory_profile()`` raises), and Python stack tracing
multiplies a step's time; so the blocks alive at the peak are categorised here by pointer *tags*: a tag names a
category, a set of storage pointers and a reference time (the start or end of a phase range); a block with a
tagged pointer that was alive at the reference time belongs to the category (gradients: pointers of ``.grad``
when the optimizer phase starts; saved activations/logits: storages autograd saved, alive when the forward
ends; optimizer state: state tensors alive when the optimizer phase ends). Everything else alive at the peak is
``transients``.

Overhead (measured on 2 CPU cores shared with other test runs, so times are noisy): profiling a step records
every op as well (the profiler cannot record allocations alone), which cost the tiny Llama's default-recipe step
~1.25x its CPU time (minimum of 20: 0.229 s against 0.179 s); SmolLM2-135M's profiled step (16,806 blocks) was
not distinguishable from its neighbours' noise (129 s against 68-110 s under that load). The analysis takes
0.04-0.09 s (tiny, ~1,000 blocks) and 0.7-2.6 s (SmolLM2). The profiler's results and their analysis also take
memory: the callback labels that phase ``profile`` (once it was the run's RSS peak under mimalloc, 30 MiB above the
steps' own peak; under glibc it stayed below). Stacks (``with_stack``) are not recorded.
"""

from __future__ import annotations

import atexit
import bisect
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

PREFIX = "memkit::"


@dataclass
class Block:
    ptr: int
    nbytes: int
    t_alloc: int
    t_free: int | None  # None: still alive when the window closed


@dataclass
class Tag:
    """Blocks whose pointer is in ``ptrs`` and that are alive at ``ref`` (("start"|"end", phase)) belong to
    ``category``."""

    category: str
    ptrs: set[int]
    ref: tuple[str, str]


@dataclass
class Window:
    """What one profiled region's events say (times in ns of the profiler's clock)."""

    blocks: dict[str, list[Block]] = field(default_factory=dict)  # device type -> blocks allocated in the window
    freed_before: dict[str, int] = field(default_factory=dict)  # device type -> bytes freed, allocated before
    ranges: list[tuple[str, int, int]] = field(default_factory=list)  # (phase, start, end), sorted by start
    t0: int = 0
    t1: int = 0


def collect(prof: Any) -> Window:
    """Allocation events and ``memkit::`` ranges of a stopped ``torch.profiler.profile``."""
    results = getattr(prof, "kineto_results", None) or prof.profiler.kineto_results
    tree = results.experimental_event_tree()
    allocs: list[tuple[int, int, int, str]] = []
    ranges: list[tuple[str, int, int]] = []
    todo = list(tree)
    t0, t1 = None, None
    while todo:
        node = todo.pop()
        ex = node.extra_fields
        t = node.start_time_ns
        if type(ex).__name__ == "_ExtraFields_Allocation":
            allocs.append((t, ex.alloc_size, ex.ptr, ex.device.type))
        else:
            name = node.name
            if name.startswith(PREFIX):
                ranges.append((name[len(PREFIX):], t, node.end_time_ns))
            todo.extend(node.children)
        t0 = t if t0 is None or t < t0 else t0
        end = getattr(node, "end_time_ns", t) or t
        t1 = end if t1 is None or end > t1 else t1
    allocs.sort(key=lambda a: a[0])
    w = Window(ranges=sorted(ranges, key=lambda r: r[1]), t0=t0 or 0, t1=t1 or 0)
    open_: dict[tuple[str, int], Block] = {}
    for t, size, ptr, dev in allocs:
        blocks = w.blocks.setdefault(dev, [])
        if size > 0:
            b = Block(ptr, size, t, None)
            open_[(dev, ptr)] = b
            blocks.append(b)
        elif size < 0:
            b = open_.pop((dev, ptr), None)
            if b is None:
                w.freed_before[dev] = w.freed_before.get(dev, 0) - size
            else:
                b.t_free = t
    return w


def _alive(b: Block, t: int) -> bool:
    return b.t_alloc <= t and (b.t_free is None or b.t_free > t)


def _ref_times(w: Window, ref: tuple[str, str]) -> list[int]:
    which, phase = ref
    return [(s if which == "start" else e) for name, s, e in w.ranges if name == phase]


def phase_at(w: Window, t: int) -> str:
    """The ``memkit::`` range that holds ``t`` (the latest that started before it), else ``other``."""
    starts = [r[1] for r in w.ranges]
    i = bisect.bisect_right(starts, t) - 1
    if i >= 0 and w.ranges[i][1] <= t <= w.ranges[i][2]:
        return w.ranges[i][0]
    return "other"


def analyze(w: Window, device: str = "cpu", base_bytes: int = 0, tags: Iterable[Tag] = (),
            max_points: int = 600) -> dict[str, Any]:
    """Peak of ``base_bytes`` + the window's live blocks on ``device``; its time, phase, the categories of the
    blocks alive then (the rest is ``transients``), and a timeline of at most ``max_points`` points (ms since
    the window opened, live bytes; each point the largest of its bucket)."""
    blocks = w.blocks.get(device, [])
    events: list[tuple[int, int]] = []
    for b in blocks:
        events.append((b.t_alloc, b.nbytes))
        if b.t_free is not None:
            events.append((b.t_free, -b.nbytes))
    events.sort(key=lambda e: (e[0], e[1]))  # frees before allocations at one instant: no phantom peak
    live, peak, t_peak = 0, 0, w.t0
    series: list[tuple[int, int]] = []
    for t, d in events:
        live += d
        series.append((t, live))
        if live > peak:
            peak, t_peak = live, t
    at_peak: dict[str, int] = {}
    tag_list = [(tg, _ref_times(w, tg.ref)) for tg in tags]
    for b in blocks:
        if not _alive(b, t_peak):
            continue
        cat = "transients"
        for tg, refs in tag_list:
            if b.ptr in tg.ptrs and any(_alive(b, r) for r in refs):
                cat = tg.category
                break
        at_peak[cat] = at_peak.get(cat, 0) + b.nbytes
    at_peak.setdefault("transients", 0)
    timeline = _downsample([(0, 0)] + [(t - w.t0, v) for t, v in series], max_points)
    return {
        "device": device,
        "base_bytes": int(base_bytes),
        "window_peak_bytes": int(peak),
        "peak_bytes": int(base_bytes + peak),
        "peak_ms": round((t_peak - w.t0) / 1e6, 3),
        "peak_phase": phase_at(w, t_peak),
        "at_peak": at_peak,
        "blocks": len(blocks),
        "freed_before_bytes": int(w.freed_before.get(device, 0)),
        "duration_ms": round((w.t1 - w.t0) / 1e6, 3),
        "phases": [{"phase": n, "start_ms": round((s - w.t0) / 1e6, 3), "end_ms": round((e - w.t0) / 1e6, 3)}
                   for n, s, e in w.ranges],
        "timeline": [[round(t / 1e6, 3), int(base_bytes + v)] for t, v in timeline],
    }


def _downsample(series: list[tuple[int, int]], max_points: int) -> list[tuple[int, int]]:
    if len(series) <= max_points:
        return series
    step = -(-len(series) // max_points)
    out = []
    for i in range(0, len(series), step):
        chunk = series[i:i + step]
        out.append(max(chunk, key=lambda p: p[1]))
    return out


_ACTIVE: "weakref.WeakSet[RegionProfiler]" = weakref.WeakSet()


def _abandon_all() -> None:
    """At interpreter exit: a profiler left running (an exception unwound the step before ``stop``) is stopped
    while torch is still whole; left to the interpreter's teardown, kineto's profiler segfaults the process."""
    for region in list(_ACTIVE):
        region.abandon()


atexit.register(_abandon_all)


class RegionProfiler:
    """Profile one region with allocation events and ``memkit::<phase>`` ranges.

    ``start()`` ... ``phase("forward")`` ... ``phase("backward")`` ... ``stop()`` -> :class:`Window`. Ranges are
    opened and closed one after another (never nested); ``phase`` may be called from different Python frames
    of one thread. CUDA activity is added when CUDA is available (its allocator reports the same events)."""

    def __init__(self, cuda: bool | None = None):
        self.cuda = cuda
        self._prof: Any = None
        self._range: Any = None
        self.seconds = 0.0  # wall time from start() to stop(), parse included
        self.parse_seconds = 0.0
        self._t = 0.0

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self, phase: str | None = None) -> None:
        import torch
        from torch.autograd.profiler import profile

        cuda = torch.cuda.is_available() if self.cuda is None else self.cuda
        self._t = time.perf_counter()
        # the autograd profiler is what torch.profiler.profile drives; used directly because the latter's
        # start() imports torch._inductor (seconds, tens of seconds on a loaded machine) to read one setting
        self._prof = profile(use_cpu=True, use_device="cuda" if cuda else None, profile_memory=True,
                             record_shapes=False, with_stack=False, use_kineto=True)
        self._prof.__enter__()
        _ACTIVE.add(self)
        if phase:
            self.phase(phase)

    def phase(self, name: str) -> None:
        if self._prof is None:
            return
        import torch

        self._close()
        self._range = torch.profiler.record_function(PREFIX + name)
        self._range.__enter__()

    def _close(self) -> None:
        if self._range is not None:
            r, self._range = self._range, None
            r.__exit__(None, None, None)

    def stop(self) -> Window:
        self._close()
        prof, self._prof = self._prof, None
        _ACTIVE.discard(self)
        prof.__exit__(None, None, None)
        t = time.perf_counter()
        w = collect(prof)
        self.parse_seconds = time.perf_counter() - t
        self.seconds = time.perf_counter() - self._t
        return w

    def abandon(self) -> None:
        """Stop without analysis (an exception inside the region)."""
        try:
            self._close()
            if self._prof is not None:
                self._prof.__exit__(None, None, None)
        except Exception:  # pragma: no cover
            pass
        self._prof = None
        _ACTIVE.discard(self)
