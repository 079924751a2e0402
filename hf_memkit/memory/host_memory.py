"""How the process gets host memory back: the allocator a run uses, and shared-library pages it no longer needs.

Why it matters (SmolLM2-135M, default recipe, 4 × 256 tokens, measured with ``torch.profiler``): the live
tensors peak at 673 MiB inside a step, the process at ~2,300 MiB. About 950 MiB of the gap is freed memory that
glibc's ``malloc`` keeps: it serves blocks below its mmap threshold from its heaps, and it *raises* that threshold
to the size of every mmapped block freed (up to 32 MiB), so after the first step nearly every activation-sized
block comes from a heap where freed memory stays part of the process. Two cures, measured on that run:

* ``mimalloc`` (Microsoft's allocator, on PyPI as ``cmeel-mimalloc``; a dependency on Linux x86-64): it gives
  freed pages back to the OS after a short delay and reuses them before that, so the peak fell to 1,546 MiB at
  the default's speed. It must replace ``malloc`` before the process starts (``LD_PRELOAD``): ``memkit train``
  re-executes itself with it, ``memkit run`` starts the script (and every launcher rank) with it.
* glibc with a *fixed* mmap threshold (``mallopt``, no dynamic raise) and two arenas: every block above 1 MiB
  is mmapped and returned on free. Peak 1,600 MiB, but each fresh block costs page faults: the issue measured
  43.7 s against 23.8 s for 4 steps. It is what a process already running (a notebook) can still do.

``allocator`` choices (``--allocator`` of ``memkit train``/``memkit run``, or ``HF_MEMKIT_ALLOCATOR``):

``auto`` (default)   mimalloc where it is installed and the process can be (re)started with it; otherwise glibc
                     with the fixed threshold when ``release_host_memory`` is asked for in-process, else nothing
``mimalloc``         mimalloc or a clear error when it is not installed
``glibc``            glibc with the fixed threshold (:data:`GLIBC_THRESHOLD`) and :data:`GLIBC_ARENAS` arenas
``system``           leave the process allocator alone (the stock behaviour, for comparisons)

Shared libraries: importing torch and transformers' Trainer maps ~200 MiB of library code and data that a CPU
training run never touches again (Triton's compiler alone is 66 MiB). They are clean file pages: the kernel may
drop them and reads them back on demand. :func:`page_out_libraries` asks it to (``madvise(MADV_PAGEOUT)``, Linux
5.4+) once the model is built; measured 598 → 396 MiB right after ``from transformers import Trainer``, and only
~12 MiB came back after a matmul. Model weights mapped from safetensors files are not touched (they are in use).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any

logger = logging.getLogger("hf_memkit")

ENV = "HF_MEMKIT_ALLOCATOR"
#: set in a process re-executed with the allocator, so it never re-executes twice
REEXEC_ENV = "HF_MEMKIT_ALLOCATOR_STARTED"
CHOICES = ("auto", "mimalloc", "glibc", "system")
#: glibc: blocks at or above this are mmapped and unmapped on free (and the dynamic raise is off)
GLIBC_THRESHOLD = 1 << 20
GLIBC_ARENAS = 2
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc <malloc.h>
MADV_PAGEOUT = 21

_state: dict[str, Any] = {"glibc_applied": False, "paged_out_bytes": 0}


class AllocatorError(ValueError):
    """An allocator choice that cannot be honoured (the message names the fix)."""


def choice(value: str | None = None) -> str:
    """The allocator asked for: ``value``, else ``HF_MEMKIT_ALLOCATOR``, else ``auto``."""
    v = (value or os.environ.get(ENV) or "auto").strip().lower()
    if v not in CHOICES:
        raise AllocatorError(f"unknown allocator {v!r} (from {'--allocator' if value else ENV}); "
                             f"choose one of {', '.join(CHOICES)}")
    return v


def mimalloc_library() -> str | None:
    """Path of the installed libmimalloc (``cmeel-mimalloc``), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import importlib.metadata as md

        files = md.files("cmeel-mimalloc") or []
    except Exception:  # not installed
        return None
    for f in files:
        if str(f).endswith("libmimalloc.so"):
            path = str(f.locate())
            if os.path.exists(path):
                return os.path.realpath(path)
    return None


def active() -> str:
    """The allocator serving this process now: ``mimalloc`` (preloaded), ``glibc`` or ``other``."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/maps") as f:
                if "libmimalloc" in f.read():
                    return "mimalloc"
        except OSError:  # pragma: no cover - /proc is always there on Linux
            pass
        return "glibc" if libc_mallopt() is not None else "other"
    return "other"


def wants_mimalloc(value: str | None = None) -> bool:
    """Whether a process about to start should get mimalloc (raises when ``mimalloc`` is asked and missing)."""
    c = choice(value)
    if c == "mimalloc" and mimalloc_library() is None:
        raise AllocatorError("allocator 'mimalloc' is not installed (pip package cmeel-mimalloc, Linux only); "
                             "install it, or use --allocator glibc")
    return c in ("auto", "mimalloc") and mimalloc_library() is not None


def child_env(env: dict[str, str] | None = None, value: str | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a child process started with the chosen allocator: mimalloc
    preloaded, or glibc's fixed threshold through its environment variables."""
    env = dict(os.environ if env is None else env)
    c = choice(value)
    env[ENV] = c
    if wants_mimalloc(c):
        lib = mimalloc_library()
        pre = env.get("LD_PRELOAD", "")
        if lib not in pre.split(":"):
            env["LD_PRELOAD"] = f"{lib}:{pre}" if pre else lib
    elif c in ("auto", "glibc") and sys.platform.startswith("linux"):
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(GLIBC_THRESHOLD))
        env.setdefault("MALLOC_ARENA_MAX", str(GLIBC_ARENAS))
    env[REEXEC_ENV] = "1"
    return env


def reexec_if_needed(argv: list[str], value: str | None = None) -> None:
    """Re-execute this interpreter with ``argv`` under the chosen allocator when it is not the one serving the
    process (``memkit train``: call before anything heavy is imported). Returns when nothing needs doing."""
    c = choice(value)
    if os.environ.get(REEXEC_ENV) or c == "system":
        return
    if wants_mimalloc(c) and active() != "mimalloc":
        env = child_env(value=c)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv], env)


def libc_mallopt():
    """glibc's ``mallopt`` as a ctypes function, or None where the C library has none (musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


def release_host_memory(value: str | None = None) -> str:
    """In-process: make freed memory go back to the OS with what is still possible once the process runs. Under
    mimalloc nothing is needed; under glibc (``auto``/``glibc``) the mmap threshold is fixed and the arenas
    capped (for the process's lifetime). Returns the allocator that serves the process afterwards."""
    c = choice(value)
    now = active()
    if c == "system" or now == "mimalloc":
        return now
    if c == "mimalloc":
        raise AllocatorError("mimalloc must be loaded when the process starts; start the run with `memkit train` "
                             "or `memkit run`, or LD_PRELOAD=" + (mimalloc_library() or "<libmimalloc.so>"))
    if now == "glibc" and not _state["glibc_applied"]:
        mallopt = libc_mallopt()
        if mallopt(M_MMAP_THRESHOLD, GLIBC_THRESHOLD) == 1 and mallopt(M_ARENA_MAX, GLIBC_ARENAS) == 1:
            _state["glibc_applied"] = True
            logger.info("hf_memkit: glibc malloc gives freed blocks >= %d KiB back to the OS (fixed mmap "
                        "threshold, %d arenas); mimalloc does it faster: start with `memkit train`/`memkit run`",
                        GLIBC_THRESHOLD >> 10, GLIBC_ARENAS)
    return now


def libc_madvise():
    """The C library's ``madvise(addr, length, advice)`` as a ctypes function, or None (not Linux, no such
    symbol)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise


def page_out_libraries() -> int:
    """Ask the kernel to drop this process's resident pages of shared libraries (clean file pages, read back on
    demand). Returns the bytes of RSS released (0 where unsupported)."""
    madvise = libc_madvise()
    if madvise is None:
        return 0
    before = _rss_file()
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:  # pragma: no cover
        return 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or ".so" not in os.path.basename(parts[5]):
            continue  # only shared objects: never data files such as mmapped safetensors weights
        start, end = (int(x, 16) for x in parts[0].split("-"))
        madvise(start, end - start, MADV_PAGEOUT)  # EINVAL before Linux 5.4: nothing released, nothing lost
    released = max(before - _rss_file(), 0)
    _state["paged_out_bytes"] += released
    logger.info("hf_memkit: %.0f MiB of shared-library pages handed back to the OS (re-read on demand)",
                released / 2**20)
    return released


def collect() -> None:
    """Give the allocator's free memory back to the OS now (mimalloc: ``mi_collect(true)``; glibc:
    ``malloc_trim(0)``). The memory report calls it before it analyses its profiled step, so that the analysis
    reuses what the step freed instead of adding to the process peak."""
    if not sys.platform.startswith("linux"):
        return
    try:
        if active() == "mimalloc":
            lib = ctypes.CDLL(mimalloc_library() or "libmimalloc.so")
            lib.mi_collect.argtypes, lib.mi_collect.restype = (ctypes.c_bool,), None
            lib.mi_collect(True)
        else:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
            libc.malloc_trim(0)
    except (OSError, AttributeError):  # another C library, or no such symbol: nothing to do
        pass


def _rss_file() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return 0


def describe() -> dict[str, Any]:
    """What the report records: the allocator serving the process and the settings in force."""
    now = active()
    out: dict[str, Any] = {"allocator": now, "requested": choice()}
    if now == "mimalloc":
        out["library"] = mimalloc_library()
        out["settings"] = {k: v for k, v in os.environ.items() if k.startswith("MIMALLOC_")}
    elif now == "glibc":
        env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        if _state["glibc_applied"]:
            env.update({"mmap_threshold": GLIBC_THRESHOLD, "arena_max": GLIBC_ARENAS})
        out["settings"] = env
    out["library_pages_released_bytes"] = _state["paged_out_bytes"]
    return out

