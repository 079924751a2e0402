"""The Triton kernels against the reference (compiled on CUDA; under the interpreter in a child process started
by test_triton_interpreter.py on CPU-only machines)."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA: these kernels run under the Triton interpreter in a child process "
                "(test_triton_interpreter.py)", allow_module_level=True)

try:
    import triton  # noqa: F401
except Exception as exc:
    pytest.skip(f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton", allow_module_level=True)

from hf_memkit.ops.stochastic_quant import dequantize, dequantize_reference, quantize, quantize_reference  # noqa
from hf_memkit.ops.stochastic_quant.reference import scale_of  # noqa: E402
from hf_memkit.ops.stochastic_quant.triton import dequantize_triton, quantize_triton  # noqa: E402


def _problem(outer, groups, inner, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(outer, groups, inner, generator=g) * torch.linspace(0.1, 5, groups).view(1, -1, 1)).to(dtype)
    flat = x.float().transpose(0, 1).reshape(groups, -1)
    alpha, beta = flat.amax(1) - flat.amin(1), flat.amin(1)
    return x.to(DEVICE), scale_of(alpha).to(DEVICE), beta.to(DEVICE), alpha.to(DEVICE)


@pytest.mark.parametrize("shape", [(3, 4, 17), (1, 1, 5), (7, 3, 200), (2, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rounds_to_a_neighbour_level(shape, dtype):
    x, s, b, alpha = _problem(*shape, dtype)
    q = quantize_triton(x, s, b, seed=123)
    v = (x.float() - b.view(1, -1, 1)) * s.view(1, -1, 1)
    lo = torch.floor(v).clamp(0, 255)
    hi = torch.ceil(v).clamp(0, 255)
    qf = q.float()
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert ((qf == lo) | (qf == hi)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_reference_exactly(dtype):
    x, s, b, _ = _problem(5, 3, 33, torch.float32)
    q = quantize_reference(x, s, b)
    got, want = dequantize_triton(q, s, b, dtype), dequantize_reference(q, s, b, dtype)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # the interpreter converts fp32 -> bf16 by truncation, CUDA rounds to nearest: within one bf16 step
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)


def test_triton_is_unbiased_and_within_one_step():
    x, s, b, alpha = _problem(1, 2, 40, torch.float32, seed=3)
    draws = x.expand(2000, 2, 40).contiguous()
    xh = dequantize_triton(quantize_triton(draws, s, b, seed=7), s, b, torch.float32)
    assert ((xh - draws).abs() <= (alpha / 255).view(1, -1, 1) * (1 + 1e-5)).all()
    assert (xh.mean(0) - x[0]).abs().max() < 3e-3


def test_seeds_give_reproducible_draws():
    x, s, b, _ = _problem(4, 2, 30, torch.float32)
    assert torch.equal(quantize_triton(x, s, b, 5), quantize_triton(x, s, b, 5))
    assert not torch.equal(quantize_triton(x, s, b, 5), quantize_triton(x, s, b, 6))


def test_dispatch_picks_triton():
    x, s, b, _ = _problem(2, 2, 10, torch.float32)
    q = quantize(x, s, b, impl="triton")
    assert torch.equal(dequantize(q, s, b, torch.float32, impl="triton"), dequantize_reference(q, s, b, torch.float32))
