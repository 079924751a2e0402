"""Host-memory estimate vs the measured peak RSS of 2 CPU ranks under ``zero3_offload`` with a host budget.

Each rank (``rss_probe.py``) records its RSS before the model exists, resets the high-water mark, trains 3 steps
and reports the peak growth; the estimate is ``host_offload`` plus the compute terms (activations, logits, loss
buffers: on a CPU-only machine the device is the host). ``MALLOC_MMAP_THRESHOLD_`` pins glibc's mmap threshold
so RSS follows the live bytes (see :mod:`hf_memkit.memory.host` for what the dynamic threshold does instead).
The tiny model's growth is mostly DeepSpeed's runtime (the calibrated constant); the wide model (22M
parameters) checks the terms that scale with the model and the budget."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import ROOT, free_port
from tests.integrations.test_launcher import explain, run

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("rss_probe.py")


@pytest.mark.parametrize("kind", ["tiny", "wide"])
def test_zero3_offload_host_estimate_within_15_percent_of_rank_peak_rss(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    out.mkdir()
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
                str(PROBE), str(out), kind, "2", "3"], cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    for rank in (0, 1):
        r = json.loads((out / f"rss_rank{rank}.json").read_text())
        estimate = r["host_offload"]["total_bytes"] + r["compute"]
        assert estimate == pytest.approx(r["growth"], rel=0.15), (kind, rank, estimate, r["growth"], r["host_offload"])
