"""The ``runtime`` part of a planned process peak: the RSS of a ``memkit train`` process just before its model
loads, measured in a child started the way ``memkit train`` starts (same allocator, same imports, library pages
handed back). The planner's own process is no measure: it has imported the estimator and built meta models, and
never handed its library pages back (measured here: ~330 MiB more than a SmolLM2 training process's runtime).

``python -m hf_memkit.planner.runtime`` prints the bytes."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

PROBE = "hf_memkit.planner.runtime"
RUNTIME_ENV = "HF_MEMKIT_RUNTIME_BYTES"


@functools.lru_cache(maxsize=4)
def measure_runtime(allocator: str | None = None) -> int:
    """RSS bytes of a fresh training process before its model loads (``allocator``: as ``memkit train
    --allocator``); falls back to this process's own RSS with the Trainer imported when the child fails.
    ``HF_MEMKIT_RUNTIME_BYTES`` set to a number skips the child (a runtime measured before; the test suite)."""
    given = os.environ.get(RUNTIME_ENV, "").strip()
    if given:
        try:
            return int(float(given))
        except ValueError:
            from ..errors import MemkitError

            raise MemkitError(f"{RUNTIME_ENV}={given!r} is not a number of bytes; unset it to measure the runtime")
    env = dict(os.environ)
    if allocator:
        env["HF_MEMKIT_ALLOCATOR"] = allocator
    try:
        r = subprocess.run([sys.executable, "-m", PROBE], capture_output=True, text=True, env=env, timeout=300)
        line = next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("RUNTIME "))
        return int(line.split()[1])
    except (StopIteration, ValueError, OSError, subprocess.SubprocessError):
        from ..memory import process

        return process.runtime_rss_bytes()


def _probe() -> None:
    from ..memory import host_memory

    host_memory.reexec_if_needed(["-m", PROBE])
    host_memory.release_host_memory()
    # what memkit train imports before its "load" mark (hf_memkit/train.py)
    import torch  # noqa: F401
    from transformers import default_data_collator  # noqa: F401

    from ..data.corpus import block_dataset  # noqa: F401
    from ..integrations.memkit_trainer import MemkitTrainer  # noqa: F401
    from ..memory import process
    from ..memory.estimate import estimate_memory  # noqa: F401
    from ..memory.profiler import MemoryReportCallback  # noqa: F401

    host_memory.page_out_libraries()
    print(f"RUNTIME {process.rss_bytes()}", flush=True)


if __name__ == "__main__":
    _probe()
