"""Runs a kernel test file in a child process under the Triton interpreter (TRITON_INTERPRET=1), on machines
without CUDA: the interpreter must be on before triton is first imported, which in this process may already have
happened (other libraries import it). Shared by the ``test_triton_interpreter.py`` files of each op."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

needs_interpreter = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, test_triton.py runs the compiled kernels itself"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"),
]


def run_under_interpreter(target: Path, min_passed: int) -> None:
    """Run ``target`` with pytest under the interpreter; at least ``min_passed`` tests pass and none is skipped."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", str(target)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = re.findall(r"(\d+) (passed|skipped|failed)", proc.stdout.splitlines()[-1])
    assert dict((k, int(n)) for n, k in summary).get("passed", 0) >= min_passed and "skipped" not in dict(
        (k, n) for n, k in summary), tail
