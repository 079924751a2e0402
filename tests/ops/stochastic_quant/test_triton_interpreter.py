"""Runs test_triton.py in a child process under the Triton interpreter (TRITON_INTERPRET=1), on machines without
CUDA: the interpreter must be on before triton is first imported, which in this process may already have
happened (other libraries import it)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, test_triton.py runs the compiled kernels itself")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    target = str(Path(__file__).with_name("test_triton.py"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", target],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = re.findall(r"(\d+) (passed|skipped|failed)", proc.stdout.splitlines()[-1])
    assert dict((k, int(n)) for n, k in summary).get("passed", 0) >= 12 and "skipped" not in dict(
        (k, n) for n, k in summary), tail
