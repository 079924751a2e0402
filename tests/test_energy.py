"""Energy and CO2 (hf_memkit/energy.py): the report's arithmetic from codecarbon's data, a real offline
measurement, and a clear 'not measured' when codecarbon is missing."""

from __future__ import annotations

import builtins
import time
from types import SimpleNamespace

import pytest

from hf_memkit.energy import J_PER_KWH, EnergyMeter, describe, energy_report


def test_the_report_converts_units_and_states_the_grid_constant():
    data = SimpleNamespace(energy_consumed=2e-4, emissions=7.5e-5, duration=3.0, cpu_energy=1.5e-4,
                           ram_energy=5e-5, gpu_energy=0.0, cpu_model="Some CPU", gpu_model=None)
    r = energy_report(data, "CPU: RAPL", "FRA", tokens=4000)
    assert r["measured"] and r["energy_j"] == pytest.approx(2e-4 * J_PER_KWH) == pytest.approx(720.0)
    assert r["co2eq_g"] == pytest.approx(0.075)
    assert r["grid_g_per_kwh"] == pytest.approx(375.0)  # 0.075 g / 2e-4 kWh
    assert r["energy_j_per_1k_tokens"] == pytest.approx(180.0)
    assert r["co2eq_g_per_1k_tokens"] == pytest.approx(0.01875)
    assert r["method"] == "codecarbon offline (CPU: RAPL)" and r["country_iso_code"] == "FRA"
    assert "720 J" in describe(r) and "375.0 g/kWh (FRA)" in describe(r)


def test_without_codecarbon_the_report_says_so(monkeypatch):
    real = builtins.__import__

    def no_codecarbon(name, *a, **kw):
        if name == "codecarbon" or name.startswith("codecarbon."):
            raise ImportError("no codecarbon")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_codecarbon)
    r = EnergyMeter("USA").start().stop(tokens=10)
    assert r["measured"] is False and "hf_memkit[energy]" in r["why"]
    assert describe(r).startswith("energy: not measured (codecarbon is not installed")


def test_a_real_offline_measurement_of_busy_work():
    pytest.importorskip("codecarbon")
    meter = EnergyMeter("DEU", measure_power_secs=0.5).start()
    t0 = time.perf_counter()
    x = 0
    while time.perf_counter() - t0 < 1.2:
        x += sum(i * i for i in range(10_000))
    r = meter.stop(tokens=1000)
    assert r["measured"], r
    assert r["energy_kwh"] > 0 and r["energy_j"] == pytest.approx(r["energy_kwh"] * J_PER_KWH, rel=1e-3)
    assert r["co2eq_g"] > 0 and r["grid_g_per_kwh"] > 0 and r["country_iso_code"] == "DEU"
    assert r["method"].startswith("codecarbon offline (") and "CPU: " in r["method"] and r["duration_s"] >= 1.0
