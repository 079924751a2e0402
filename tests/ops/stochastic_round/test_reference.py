"""Stochastic rounding fp32 -> bf16/fp16: unbiased, always one of the two neighbours, seeded, special values kept,
and the bit trick (bf16) agrees with the neighbour method."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.ops.stochastic_round import round_into_, sr_bf16_bits, sr_neighbours, stochastic_round

DTYPES = [torch.bfloat16, torch.float16]


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) representable neighbours of fp32 x in ``dtype`` (equal when x is representable)."""
    near = x.to(dtype)
    up = torch.nextafter(near, torch.full_like(near, float("inf")))
    down = torch.nextafter(near, torch.full_like(near, float("-inf")))
    lower = torch.where(near.float() <= x, near, down)
    upper = torch.where(near.float() >= x, near, up)
    return lower.float(), upper.float()


@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_of_many_roundings_is_within_three_sigma(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, generator=g) * torch.logspace(-3, 3, 32)  # many binades, both signs
    draws = 10_000
    rounded = stochastic_round(x.expand(draws, -1).contiguous(), dtype, g).double()
    lower, upper = (t.double() for t in _neighbours(x, dtype))
    x64 = x.double()
    p = torch.where(upper > lower, (x64 - lower) / (upper - lower), torch.zeros_like(x64))
    sigma = (upper - lower) * (p * (1 - p)).sqrt() / draws**0.5
    z = (rounded.mean(0) - x64).abs() / sigma.clamp_min(1e-300)
    z = torch.where(sigma > 0, z, (rounded.mean(0) - x64).abs())  # representable x: never moves
    # 32 independent 3-sigma checks: a few may sit between 3 and 4 sigma by chance, a bias would not
    assert float((z <= 3).double().mean()) >= 0.9 and float(z.max()) <= 4.5, z


def test_quarter_ulp_rounds_up_a_quarter_of_the_time():
    # the spec's check: 1 + 2^-9 lies a quarter of the way from 1 to the next bf16 value 1 + 2^-7
    x = torch.full((100_000,), 1 + 2**-9)
    out = sr_bf16_bits(x, torch.Generator().manual_seed(1)).float()
    assert set(out.unique().tolist()) == {1.0, 1 + 2**-7}
    up = float((out > 1).float().mean())
    assert abs(up - 0.25) < 3 * (0.25 * 0.75 / x.numel()) ** 0.5
    assert abs(float(out.mean()) - (1 + 2**-9)) < 3 * 2**-7 * (0.25 * 0.75 / x.numel()) ** 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_result_is_always_one_of_the_two_neighbours(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50_000, generator=g) * 10.0 ** torch.randint(-6, 4, (50_000,), generator=g)
    out = stochastic_round(x, dtype, g).float()
    lower, upper = _neighbours(x, dtype)
    assert bool(((out == lower) | (out == upper)).all())


def test_bit_trick_and_neighbour_method_agree_in_distribution():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, generator=g)
    many = x.expand(20_000, -1).contiguous()
    a = sr_bf16_bits(many, g).float().mean(0)
    b = sr_neighbours(many, torch.bfloat16, g).float().mean(0)
    ulp = (_neighbours(x, torch.bfloat16)[1] - _neighbours(x, torch.bfloat16)[0]).clamp_min(1e-30)
    assert bool(((a - b).abs() <= 6 * 0.5 * ulp / 20_000**0.5).all())


def test_explicit_noise_gives_the_two_ends():
    x = torch.tensor([1 + 2**-9])
    low = int(x.view(torch.int32)) & 0xFFFF
    assert float(sr_bf16_bits(x, noise=torch.tensor([65536 - low - 1], dtype=torch.int32))) == 1.0
    assert float(sr_bf16_bits(x, noise=torch.tensor([65536 - low], dtype=torch.int32))) == 1 + 2**-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_are_kept(dtype):
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -2.5])
    out = stochastic_round(x, dtype, torch.Generator().manual_seed(4))
    ref = x.to(dtype)
    same = (out == ref) | (torch.isnan(out) & torch.isnan(ref))
    assert bool(same.all())
    assert torch.equal(torch.signbit(out[:2]), torch.tensor([False, True]))


def test_nan_with_a_low_payload_stays_nan():
    nan = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)  # payload only in the low 16 bits
    assert bool(torch.isnan(sr_bf16_bits(nan, torch.Generator().manual_seed(5))).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_seed_same_result(dtype):
    x = torch.randn(3000, generator=torch.Generator().manual_seed(6))
    a = stochastic_round(x, dtype, torch.Generator().manual_seed(7))
    b = stochastic_round(x, dtype, torch.Generator().manual_seed(7))
    c = stochastic_round(x, dtype, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_into_writes_in_place_chunk_by_chunk(dtype):
    x = torch.randn(10, 1000, generator=torch.Generator().manual_seed(9))
    out = torch.empty(10, 1000, dtype=dtype)
    ptr = out.data_ptr()
    round_into_(out, x, "stochastic", torch.Generator().manual_seed(10), chunk=333)
    assert out.data_ptr() == ptr
    lower, upper = _neighbours(x, dtype)
    assert bool(((out.float() == lower) | (out.float() == upper)).all())
    again = torch.empty_like(out)
    round_into_(again, x, "stochastic", torch.Generator().manual_seed(10), chunk=333)
    assert torch.equal(out, again)
    round_into_(out, x, "nearest")
    assert torch.equal(out, x.to(dtype))


def test_round_into_refuses_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        round_into_(torch.empty(3, dtype=torch.bfloat16), torch.zeros(3), "up")
    with pytest.raises(ValueError, match="shapes"):
        round_into_(torch.empty(3, dtype=torch.bfloat16), torch.zeros(4))
    with pytest.raises(TypeError, match="fp32"):
        sr_bf16_bits(torch.zeros(3, dtype=torch.float64))
