"""Runs test_triton.py in a child process under the Triton interpreter on machines without CUDA (see
tests/ops/triton_child.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ops.triton_child import needs_interpreter, run_under_interpreter

pytestmark = pytest.mark.slow  # the kernels run under the Triton interpreter in a child process


def test_triton_kernels_under_the_interpreter():
    run_under_interpreter(Path(__file__).with_name("test_triton.py"), min_passed=17)


for _mark in needs_interpreter:
    test_triton_kernels_under_the_interpreter = _mark(test_triton_kernels_under_the_interpreter)
