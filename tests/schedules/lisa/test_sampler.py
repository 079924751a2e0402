"""The layer sampler: γ distinct layers, uniform, and a state that reproduces the future draws."""

from __future__ import annotations

from collections import Counter

from hf_memkit.schedules.lisa.sampler import LayerSampler


def test_draws_are_distinct_sorted_and_uniform():
    s = LayerSampler(6, 2)
    s.seed(0)
    counts = Counter()
    for _ in range(3000):
        d = s.draw()
        assert len(set(d)) == 2 and d == sorted(d) and all(0 <= i < 6 for i in d)
        counts.update(d)
    for i in range(6):  # each layer is drawn with probability γ/N = 1/3
        assert abs(counts[i] / 3000 - 1 / 3) < 0.04


def test_state_round_trip_reproduces_the_next_draws():
    a = LayerSampler(30, 2)
    a.seed(42)
    a.draw()
    state = a.get_state().clone()
    expected = [a.draw() for _ in range(5)]
    b = LayerSampler(30, 2)
    b.set_state(state)
    assert [b.draw() for _ in range(5)] == expected
    assert LayerSampler(4, 9).active == 4  # γ > N is clamped (the technique rejects it before)
