"""Readers of this process's memory, and a sampler that follows the resident set across a run.

What the readers return (bytes; Linux reads ``/proc/self``, other systems get what ``resource`` offers or None):

* :func:`rss_bytes` — resident set now (``/proc/self/statm`` field 2 x page size);
* :func:`peak_rss_bytes` — the kernel's high-water mark ``VmHWM`` (``ru_maxrss`` elsewhere: KiB on Linux, bytes
  on macOS);
* :func:`read_status` — ``VmRSS``/``VmHWM``/``RssAnon``/``RssFile``/``RssShmem`` of ``/proc/self/status``.
  ``RssFile`` holds the pages of mapped files that are resident: shared libraries *and* memory-mapped weights
  (safetensors tensors that were loaded with mmap are file pages, never allocations, see :func:`file_mapped`);
* :func:`mapping_rss` — ``/proc/self/smaps`` per mapping (``Rss`` and its ``Anonymous`` part: a private file
  mapping that was written to holds copy-on-write pages, which count as ``RssAnon``). Tens of milliseconds:
  read it at report time, not in a loop;
* :func:`allocator_name` / :func:`allocator_stats` — which ``malloc`` the process runs on (the mapping the
  global ``malloc`` symbol lives in: ``libc.so`` -> glibc, ``libmimalloc`` -> mimalloc, also jemalloc/tcmalloc
  by name) and what it holds:

  - glibc, ``mallinfo2()`` (glibc >= 2.33; ``mallinfo()`` with 32-bit fields before, which wrap at 4 GiB), summed
    over every arena by glibc itself: ``free_bytes`` = ``fordblks`` (free chunks in the arenas, the top chunk and
    fastbins included: memory the allocator keeps after ``free``, which the OS still counts as resident unless it
    was never touched or was trimmed), ``top_bytes`` = ``keepcost`` (the releasable top chunk, part of
    ``free_bytes``), ``in_use_bytes`` = ``uordblks + hblkhd`` (chunks handed out, from the arenas and mmapped),
    ``mmapped_bytes`` = ``hblkhd`` (chunks above the mmap threshold: freed back to the OS at once), and
    ``arena_bytes`` = ``arena``. ``free_bytes`` is an upper bound of the resident slack;
  - mimalloc, ``mi_process_info()``: ``committed_bytes``/``peak_committed_bytes`` (what mimalloc committed from
    the OS) and mimalloc's own RSS figures. A release build of mimalloc does not count the bytes in use (its
    ``malloc_normal``/``malloc_requested`` statistics stay 0 unless built with ``MI_STAT``), so it cannot say its
    free bytes: ``free_bytes`` is None and the breakdown estimates the slack as committed minus live tensors;
  - anything else: None.

:class:`RssSampler` is a daemon thread that reads ``/proc/self/statm`` every few milliseconds (one ``pread`` of
an open file, a few microseconds) and labels every sample with the current phase (:func:`mark`). Each time the
resident set reaches a new maximum it also reads :func:`allocator_stats`, so the slack *at* the peak is known.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from typing import Any

MiB = 2**20
#: the phases :class:`~hf_memkit.memory.profiler.MemoryReportCallback` marks inside a training step
TRAIN_PHASES = ("forward", "backward", "optimizer")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ------------------------------------------------------------------------------------------------------------
# the resident set


def _statm(fd: int | None = None) -> tuple[int, int] | None:
    """(resident, shared) bytes from ``/proc/self/statm``: shared = resident file pages + shmem."""
    try:
        if fd is None:
            with open("/proc/self/statm", "rb") as f:
                raw = f.read()
        else:
            raw = os.pread(fd, 128, 0)
        fields = raw.split()
        return int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def read_status() -> dict[str, int]:
    """``rss``, ``peak_rss``, ``rss_anon``, ``rss_file``, ``rss_shmem`` (bytes) from ``/proc/self/status``; {}
    where it does not exist."""
    names = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "rss_anon", "RssFile": "rss_file",
             "RssShmem": "rss_shmem"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in names:
                    out[names[key]] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return {}
    return out


def rss_bytes() -> int:
    """Resident set size now (bytes); the peak where no current figure is available."""
    s = _statm()
    if s is not None:
        return s[0]
    try:  # pragma: no cover - non-Linux
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: ``VmHWM`` on Linux, ``ru_maxrss`` elsewhere."""
    hwm = read_status().get("peak_rss")
    if hwm:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ------------------------------------------------------------------------------------------------------------
# mappings


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file-backed mapping of this process (``/proc/self/maps``); [] elsewhere."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    a, b = parts[0].split("-")
                    out.append((int(a, 16), int(b, 16), parts[5].rstrip("\n").removesuffix(" (deleted)")))
    except OSError:
        return []
    return out


def mapping_rss() -> list[dict[str, Any]]:
    """Per mapping of ``/proc/self/smaps``: start, end, path ('' for anonymous), rss, anonymous (bytes)."""
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line[:1]
                if head.isdigit() or ("a" <= head <= "f"):  # "start-end perms offset dev inode [path]"
                    parts = line.split(None, 5)
                    if "-" in parts[0] and len(parts) >= 5:
                        a, b = parts[0].split("-")
                        cur = {"start": int(a, 16), "end": int(b, 16),
                               "path": parts[5].strip() if len(parts) == 6 else "", "rss": 0, "anonymous": 0}
                        out.append(cur)
                        continue
                if cur is not None:
                    if line.startswith("Rss:"):
                        cur["rss"] = int(line.split()[1]) * 1024
                    elif line.startswith("Anonymous:"):
                        cur["anonymous"] = int(line.split()[1]) * 1024
    except OSError:
        return []
    return out


def _find(ranges: list[tuple[int, int, str]], ptr: int) -> str | None:
    import bisect

    i = bisect.bisect_right(ranges, (ptr, float("inf"), "")) - 1
    if i >= 0 and ranges[i][0] <= ptr < ranges[i][1]:
        return ranges[i][2]
    return None


def file_mapped(tensors: Any) -> dict[str, int]:
    """Storage bytes of ``tensors`` split by where the storage lives: ``file_mapped`` (inside a file mapping of
    this process: safetensors weights loaded with mmap, which the allocator never saw) and ``allocator`` (the
    rest), each storage once. Works by comparing the storages' data pointers with ``/proc/self/maps``; off Linux
    every storage counts as ``allocator``."""
    maps = sorted(file_mappings())
    seen: set[int] = set()
    out = {"file_mapped": 0, "allocator": 0}
    files: dict[str, int] = {}
    for t in tensors:
        if t is None or t.device.type != "cpu":
            continue
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr in seen or not ptr:
            continue
        seen.add(ptr)
        path = _find(maps, ptr) if maps else None
        if path is None:
            out["allocator"] += s.nbytes()
        else:
            out["file_mapped"] += s.nbytes()
            files[path] = files.get(path, 0) + s.nbytes()
    out["files"] = files  # type: ignore[assignment]
    return out


def page_out_file_pages(tensors: Any, maps: "list[tuple[int, int, str]] | None" = None) -> int:
    """Ask the kernel to reclaim the resident pages of ``tensors`` that lie in a file mapping (weights loaded with
    mmap whose values were just copied elsewhere, e.g. quantized): ``madvise(MADV_PAGEOUT)`` on the whole pages
    inside each tensor's bytes. Nothing is lost: clean file pages are read back on demand, and pages a write made
    private are not discarded. Returns the bytes advised (0 off Linux, or where nothing is file-mapped)."""
    maps = sorted(file_mappings()) if maps is None else maps
    if not maps:
        return 0
    import mmap as _mmap

    from .host_memory import MADV_PAGEOUT, libc_madvise

    madvise = libc_madvise()
    if madvise is None:
        return 0
    page = _mmap.PAGESIZE
    advised = 0
    for t in tensors:
        if t is None or t.device.type != "cpu" or not t.numel():
            continue
        start = t.data_ptr()
        if _find(maps, start) is None:
            continue
        lo = -(-start // page) * page
        hi = (start + t.numel() * t.element_size()) // page * page
        if hi > lo and madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
            advised += hi - lo
    return advised


def own_file_mapped_(module: Any) -> int:
    """Copy every parameter and buffer of ``module`` whose storage lies in a file mapping (safetensors loaded with
    mmap) into memory the process owns, so that the mapping can go once nothing else uses it. Worth it once most
    of a mapped file is no longer needed (``adapter: qlora`` after quantizing): every page of the file that was
    ever read stays resident, and counted in RSS, for as long as one tensor keeps the mapping alive. Returns the
    bytes copied (0 off Linux)."""
    maps = sorted(file_mappings())
    if not maps:
        return 0
    copied = 0
    tensors = [*module.named_parameters(remove_duplicate=True), *module.named_buffers(remove_duplicate=True)]
    for _, t in tensors:
        if t is None or t.device.type != "cpu" or not t.untyped_storage().data_ptr():
            continue
        if _find(maps, t.untyped_storage().data_ptr()) is not None:
            t.data = t.data.clone()
            copied += t.numel() * t.element_size()
    return copied


def mapping_resident(paths: Any) -> dict[str, int]:
    """Resident bytes of the mappings of the files ``paths``: ``rss`` (every resident page of those mappings)
    and ``anonymous`` (the part a write turned into private copy-on-write pages, which the kernel counts under
    ``RssAnon``; ``rss - anonymous`` is under ``RssFile``)."""
    paths = set(paths)
    out = {"rss": 0, "anonymous": 0}
    if paths:
        for m in mapping_rss():
            if m["path"] in paths:
                out["rss"] += m["rss"]
                out["anonymous"] += m["anonymous"]
    return out


# ------------------------------------------------------------------------------------------------------------
# the allocator


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class _MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n, _ in _MallInfo2._fields_]


_ALLOC: dict[str, Any] = {}


def _libc() -> Any:
    if "libc" not in _ALLOC:
        try:
            _ALLOC["libc"] = ctypes.CDLL(None)
        except OSError:  # pragma: no cover
            _ALLOC["libc"] = None
    return _ALLOC["libc"]


def allocator_name(refresh: bool = False) -> str:
    """``glibc``, ``mimalloc``, ``jemalloc``, ``tcmalloc`` or ``unknown``: the library the process's global
    ``malloc`` symbol resolves to (an allocator preloaded with ``LD_PRELOAD`` wins the symbol)."""
    if "name" in _ALLOC and not refresh:
        return _ALLOC["name"]
    name = "unknown"
    lib = _libc()
    try:
        addr = ctypes.cast(lib.malloc, ctypes.c_void_p).value if lib is not None else None
    except (AttributeError, TypeError):  # pragma: no cover
        addr = None
    path = ""
    if addr:
        maps = sorted(file_mappings())
        path = os.path.basename(_find(maps, addr) or "")
    for key in ("mimalloc", "jemalloc", "tcmalloc"):
        if key in path:
            name = key
            break
    else:
        if path.startswith("libc.so") or path.startswith("libc-"):
            name = "glibc"
        elif not path and sys.platform.startswith("linux"):
            try:
                import platform

                name = "glibc" if platform.libc_ver()[0] == "glibc" else "unknown"
            except Exception:  # pragma: no cover
                pass
    _ALLOC["name"] = name
    return name


def _glibc_stats() -> dict[str, Any] | None:
    lib = _libc()
    if lib is None:
        return None
    fn = _ALLOC.get("mallinfo2")
    if fn is None:
        try:
            fn = lib.mallinfo2
            fn.restype = _MallInfo2
            fn.argtypes = []
            _ALLOC["mallinfo_kind"] = "mallinfo2"
        except AttributeError:
            try:  # glibc < 2.33: 32-bit fields
                fn = lib.mallinfo
                fn.restype = _MallInfo
                fn.argtypes = []
                _ALLOC["mallinfo_kind"] = "mallinfo"
            except AttributeError:
                return None
        _ALLOC["mallinfo2"] = fn
    m = fn()
    mask = (1 << 32) - 1 if _ALLOC["mallinfo_kind"] == "mallinfo" else -1
    val = (lambda x: x & mask) if mask != -1 else (lambda x: x)
    return {"allocator": "glibc", "source": _ALLOC["mallinfo_kind"],
            "free_bytes": val(m.fordblks), "top_bytes": val(m.keepcost),
            "in_use_bytes": val(m.uordblks) + val(m.hblkhd), "mmapped_bytes": val(m.hblkhd),
            "arena_bytes": val(m.arena)}


def _mimalloc_stats() -> dict[str, Any] | None:
    lib = _libc()
    try:
        fn = lib.mi_process_info
    except AttributeError:
        return None
    vals = [ctypes.c_size_t(0) for _ in range(8)]
    fn(*[ctypes.byref(v) for v in vals])
    _elapsed, _user, _sys, cur_rss, peak_rss, cur_commit, peak_commit, _faults = (v.value for v in vals)
    return {"allocator": "mimalloc", "source": "mi_process_info", "free_bytes": None,
            "committed_bytes": cur_commit, "peak_committed_bytes": peak_commit,
            "mimalloc_rss_bytes": cur_rss, "mimalloc_peak_rss_bytes": peak_rss}


def allocator_stats() -> dict[str, Any] | None:
    """What the process allocator holds now (see the module docstring for the fields); None where unknown."""
    name = allocator_name()
    try:
        if name == "glibc":
            return _glibc_stats()
        if name == "mimalloc":
            return _mimalloc_stats()
    except Exception:  # pragma: no cover - a reader must never stop training
        return None
    return None


def allocator_kind() -> str:
    """``mimalloc``, ``glibc_fixed`` (glibc with a fixed mmap threshold: ``host_memory.release_host_memory`` ran,
    or ``MALLOC_MMAP_THRESHOLD_`` is set), ``glibc`` (the stock dynamic threshold) or ``other``."""
    name = allocator_name()
    if name == "glibc":
        try:
            from . import host_memory

            if host_memory._state.get("glibc_applied"):
                return "glibc_fixed"
        except Exception:
            pass
        return "glibc_fixed" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "glibc"
    return name if name == "mimalloc" else "other"


def allocator_info() -> dict[str, Any]:
    """The allocator in use: the lead's ``host_memory.describe()`` when that module exists, else what this module
    detects (name, and for glibc the mmap threshold from the environment, if set)."""
    try:
        from . import host_memory  # type: ignore[attr-defined]

        describe = getattr(host_memory, "describe", None)
        if describe is not None:
            d = dict(describe())
            d.setdefault("detected", allocator_name())
            d.setdefault("kind", allocator_kind())
            return d
    except Exception:
        pass
    info: dict[str, Any] = {"allocator": allocator_name(), "kind": allocator_kind(),
                            "source": "hf_memkit.memory.process"}
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


def snapshot() -> dict[str, Any]:
    """RSS, its file/anonymous split and the allocator's figures now (a mark's record)."""
    st = read_status()
    out: dict[str, Any] = {"rss_bytes": st.get("rss") or rss_bytes(),
                           "rss_file_bytes": st.get("rss_file", 0) + st.get("rss_shmem", 0),
                           "rss_anon_bytes": st.get("rss_anon", 0)}
    alloc = allocator_stats()
    if alloc is not None:
        out["allocator"] = alloc
    return out


def runtime_rss_bytes() -> int:
    """RSS of this process once what a Trainer run imports is imported (``transformers.Trainer`` is imported
    here when it is not yet): the ``runtime`` of the process peak when no model is loaded yet."""
    if "transformers.trainer" not in sys.modules:
        from transformers import Trainer  # noqa: F401
    return rss_bytes()


# ------------------------------------------------------------------------------------------------------------
# the sampler


class RssSampler:
    """A daemon thread sampling RSS (and resident file pages) every ``interval`` seconds with the current phase.

    ``mark(phase)`` switches the label (the first mark of a phase records a :func:`snapshot`); a new maximum of
    the resident set also reads the allocator (:func:`allocator_stats`; at most every ``alloc_interval``
    seconds and once the maximum grew by 1 MiB), so :attr:`peak` says what the allocator held at (or within
    ``alloc_interval`` of) the peak: ``peak["allocator_rss_bytes"]`` is the RSS it was read at.
    Samples beyond ``max_samples`` are halved (each kept sample is the larger of a pair), so a long run stays
    bounded in memory and its peaks survive."""

    def __init__(self, interval: float = 0.005, max_samples: int = 20_000):
        self.interval = interval
        self.max_samples = max_samples
        self.t0 = time.perf_counter()
        self.t: list[float] = []
        self.rss: list[int] = []
        self.file: list[int] = []
        self.phase_of: list[int] = []
        self.phases: list[str] = []
        self.marks: list[tuple[float, str]] = []  # (t, phase)
        self._snapshots: dict[str, dict[str, Any]] = {}
        self.phase = "start"
        self.peak: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self.alloc_interval = 0.05
        self._alloc_rss, self._alloc_t = 0, -1.0
        self._stride = 1  # samples taken per kept sample after halving
        self._pending = 1  # samples folded into the last kept one

    # -- control
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "RssSampler":
        if self.running:
            return self
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memkit-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self._thread = None
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:  # pragma: no cover
                pass
            self._fd = None

    def mark(self, phase: str) -> None:
        """From now on samples belong to ``phase``; a sample is taken at once (a short phase has one)."""
        phase = str(phase)
        first = phase not in self._snapshots
        snap = snapshot() if first else None  # the first mark of a phase keeps what the process held then
        with self._lock:
            self.phase = phase
            t = round(time.perf_counter() - self.t0, 4)
            if first:
                self._snapshots[phase] = {"t": t, **snap}
            self.marks.append((t, phase))
        self.sample()

    def first_mark(self, phase: str) -> dict[str, Any] | None:
        """:func:`snapshot` taken at the first mark of ``phase`` (with its time ``t``), or None."""
        return self._snapshots.get(phase)

    # -- sampling
    def _phase_index(self, phase: str) -> int:
        try:
            return self.phases.index(phase)
        except ValueError:
            self.phases.append(phase)
            return len(self.phases) - 1

    def sample(self) -> None:
        s = _statm(self._fd) if self._fd is not None else _statm()
        if s is None:
            s = (rss_bytes(), 0)
        rss, file = s
        now = time.perf_counter() - self.t0
        new_peak = rss > self.peak.get("rss_bytes", 0)
        alloc = None
        if new_peak and rss >= self._alloc_rss + (1 << 20) and now - self._alloc_t >= self.alloc_interval:
            # mallinfo2 walks every free chunk under the arenas' locks (~4 ms with thousands of free chunks):
            # read it at most every alloc_interval seconds, and only as the peak grows
            alloc = allocator_stats()
            self._alloc_rss, self._alloc_t = rss, now
        with self._lock:
            if new_peak:
                self.peak.update({"t": round(now, 4), "rss_bytes": rss, "rss_file_bytes": file, "phase": self.phase})
                if alloc is not None:
                    self.peak["allocator"] = alloc
                    self.peak["allocator_rss_bytes"] = rss  # the RSS the allocator figures were read at
            idx = self._phase_index(self.phase)
            if self.t and self.phase_of[-1] == idx and self._stride > 1 and self._pending < self._stride:
                # fold into the last kept sample: keep the larger
                self._pending += 1
                if rss > self.rss[-1]:
                    self.t[-1], self.rss[-1], self.file[-1] = now, rss, file
                return
            self._pending = 1
            self.t.append(now)
            self.rss.append(rss)
            self.file.append(file)
            self.phase_of.append(idx)
            if len(self.t) > self.max_samples:
                self._halve()


    def _halve(self) -> None:
        keep = []
        i = 0
        n = len(self.t)
        while i < n:
            j = i + 1 if i + 1 < n and self.phase_of[i + 1] == self.phase_of[i] else i
            k = j if self.rss[j] > self.rss[i] else i
            keep.append(k)
            i = j + 1
        self.t = [self.t[k] for k in keep]
        self.rss = [self.rss[k] for k in keep]
        self.file = [self.file[k] for k in keep]
        self.phase_of = [self.phase_of[k] for k in keep]
        self._stride *= 2

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # pragma: no cover - the sampler must never take the run down
                pass

    # -- results
    def by_phase(self) -> dict[str, dict[str, Any]]:
        """Per phase: max RSS, seconds spent (sum of the spans), samples."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            t, rss, ph, marks = list(self.t), list(self.rss), list(self.phase_of), list(self.marks)
            names = list(self.phases)
        for i, idx in enumerate(ph):
            d = out.setdefault(names[idx], {"max_rss_bytes": 0, "samples": 0, "seconds": 0.0})
            d["max_rss_bytes"] = max(d["max_rss_bytes"], rss[i])
            d["samples"] += 1
        ends = [m[0] for m in marks[1:]] + [round(time.perf_counter() - self.t0, 4)]
        for (t0, phase), end in zip(marks, ends):
            if phase in out:
                out[phase]["seconds"] = round(out[phase]["seconds"] + max(end - t0, 0.0), 4)
        return out

    def spans(self, max_spans: int = 2000) -> list[dict[str, Any]]:
        """Consecutive (phase, start, end) spans from the marks, merged when a phase repeats back to back. Beyond
        ``max_spans`` the training phases (forward, backward, optimizer) fold into ``train`` spans."""
        with self._lock:
            marks = list(self.marks)
        if len(marks) > max_spans:
            marks = [(t, "train" if p in TRAIN_PHASES else p) for t, p in marks]
        end_all = round(time.perf_counter() - self.t0, 4)
        out: list[dict[str, Any]] = []
        for i, (t, phase) in enumerate(marks):
            end = marks[i + 1][0] if i + 1 < len(marks) else end_all
            if out and out[-1]["phase"] == phase:
                out[-1]["end"] = end
            else:
                out.append({"phase": phase, "start": t, "end": end})
        return out

    def timeline(self, max_points: int = 4000) -> dict[str, Any]:
        """JSON-ready: ``t`` (s since the sampler started), ``rss`` (bytes), ``phase`` (index into ``phases``),
        ``spans``, ``by_phase``, ``peak``, ``marks`` (the snapshot at each phase's first mark); at most
        ``max_points`` samples (peaks kept)."""
        with self._lock:
            t, rss, ph, names = list(self.t), list(self.rss), list(self.phase_of), list(self.phases)
            marks = {k: dict(v) for k, v in self._snapshots.items()}
            peak = dict(self.peak)
        if len(t) > max_points:
            step = -(-len(t) // max_points)
            keep = [max(range(i, min(i + step, len(t))), key=rss.__getitem__) for i in range(0, len(t), step)]
            t, rss, ph = [t[k] for k in keep], [rss[k] for k in keep], [ph[k] for k in keep]
        return {"interval_s": self.interval, "t": [round(x, 4) for x in t], "rss": rss, "phase": ph,
                "phases": names, "spans": self.spans(), "by_phase": self.by_phase(), "peak": peak, "marks": marks}


_SAMPLER: RssSampler | None = None


def sampler() -> RssSampler | None:
    """The process-wide sampler :func:`mark` started, or None."""
    return _SAMPLER


def start_sampler(interval: float = 0.005) -> RssSampler:
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = RssSampler(interval)
    return _SAMPLER.start()


def stop_sampler() -> None:
    global _SAMPLER
    if _SAMPLER is not None:
        _SAMPLER.stop()
        _SAMPLER = None


def mark(phase: str) -> None:
    """Label the process-wide memory timeline with ``phase`` from now on (starts the sampler on first use).
    ``memkit train`` marks ``load`` (before the model loads: that mark's RSS is the run's ``runtime``),
    ``build`` and ``save``; :class:`~hf_memkit.memory.profiler.MemoryReportCallback` marks ``forward``,
    ``backward``, ``optimizer``, ``train`` (the loop around them), ``eval`` and ``profile`` (its own analysis of
    a profiled region)."""
    start_sampler().mark(phase)


def baseline_rss(phase: str = "load") -> int | None:
    """RSS at the first :func:`mark` of ``phase`` (``load``: before the model loaded, the run's ``runtime``), or
    None when there is no such mark."""
    snap = _SAMPLER.first_mark(phase) if _SAMPLER is not None else None
    return int(snap["rss_bytes"]) if snap else None


def current_phase() -> str | None:
    return _SAMPLER.phase if _SAMPLER is not None else None
