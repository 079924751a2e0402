"""Energy and CO2-equivalent of a run, measured with ``codecarbon`` in offline mode (nothing is sent anywhere).

codecarbon reads the CPU package energy from RAPL (``/sys/class/powercap/intel-rapl``) where the file is readable,
else models the CPU from its TDP (its bundled CPU table; a constant where the CPU is unknown) times the load; RAM
by its size; an NVIDIA GPU through NVML. The grid intensity is codecarbon's per-country constant for the
``country_iso_code`` given (three letters, default :data:`DEFAULT_COUNTRY`; ``memkit train --country``). Both the
method and the constant are written into the report, so a number is never read without how it was made.

codecarbon is an optional dependency (``pip install hf_memkit[energy]``; the dev extra has it): without it the
report says so (``{"measured": false, "why": ...}``) and everything else runs as before.
"""

from __future__ import annotations

import logging
from typing import Any

DEFAULT_COUNTRY = "USA"
J_PER_KWH = 3.6e6

logger = logging.getLogger("hf_memkit")


def _methods(tracker: Any) -> str:
    """How codecarbon measured each device (``RAPL``, ``TDP model``, ``constant``, ``NVML``), from its hardware
    objects (private attributes; anything unknown is reported as such rather than guessed)."""
    parts = []
    for hw in getattr(tracker, "_hardware", []) or []:
        kind = type(hw).__name__
        mode = getattr(hw, "_mode", None)
        if kind == "CPU":
            label = {"intel_rapl": "RAPL", "intel_power_gadget": "Intel Power Gadget", "constant": "constant power",
                     "cpu_load": "TDP model x CPU load", "tdp": "TDP model"}.get(str(mode), f"mode {mode}")
            parts.append(f"CPU: {label}")
        elif kind == "GPU":
            parts.append("GPU: NVML")
        elif kind == "RAM":
            parts.append("RAM: size model")
        else:
            parts.append(kind)
    return "; ".join(parts) or "unknown"


class EnergyMeter:
    """``start()`` before the work and ``stop(tokens=...)`` after it; ``stop`` returns the report dict (also when
    codecarbon is missing or fails: then ``measured`` is False and ``why`` says why)."""

    def __init__(self, country_iso_code: str = DEFAULT_COUNTRY, measure_power_secs: float = 1.0):
        self.country = (country_iso_code or DEFAULT_COUNTRY).upper()
        self.measure_power_secs = measure_power_secs
        self._tracker: Any = None
        self._why: str | None = None

    def start(self) -> "EnergyMeter":
        try:
            from codecarbon import OfflineEmissionsTracker
        except ImportError:
            self._why = "codecarbon is not installed (pip install 'hf_memkit[energy]')"
            return self
        logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its INFO/WARNING lines would interleave the run's
        try:
            self._tracker = OfflineEmissionsTracker(
                country_iso_code=self.country, measure_power_secs=self.measure_power_secs, save_to_file=False,
                log_level="error", tracking_mode="process", project_name="hf_memkit")
            self._tracker.start()
        except Exception as exc:  # a measurement must never stop a training run; the report says what happened
            self._tracker = None
            self._why = f"codecarbon could not start: {type(exc).__name__}: {exc}"
        return self

    def stop(self, tokens: int | None = None) -> dict[str, Any]:
        if self._tracker is None:
            return {"measured": False, "why": self._why or "not started", "country_iso_code": self.country}
        try:
            self._tracker.stop()
            data = self._tracker.final_emissions_data
        except Exception as exc:
            return {"measured": False, "why": f"codecarbon failed: {type(exc).__name__}: {exc}",
                    "country_iso_code": self.country}
        return energy_report(data, _methods(self._tracker), self.country, tokens)


def energy_report(data: Any, method: str, country: str, tokens: int | None) -> dict[str, Any]:
    """The report dict from codecarbon's ``EmissionsData`` (energy in kWh, emissions in kg)."""
    kwh = float(getattr(data, "energy_consumed", 0.0) or 0.0)
    kg = float(getattr(data, "emissions", 0.0) or 0.0)
    out = {
        "measured": True,
        "energy_kwh": kwh,
        "energy_j": round(kwh * J_PER_KWH, 3),
        "co2eq_g": round(kg * 1000, 6),
        "duration_s": round(float(getattr(data, "duration", 0.0) or 0.0), 3),
        "cpu_energy_kwh": float(getattr(data, "cpu_energy", 0.0) or 0.0),
        "ram_energy_kwh": float(getattr(data, "ram_energy", 0.0) or 0.0),
        "gpu_energy_kwh": float(getattr(data, "gpu_energy", 0.0) or 0.0),
        "method": f"codecarbon offline ({method})",
        "country_iso_code": country,
        # the constant behind the CO2 figure: emissions / energy, as codecarbon applied it
        "grid_g_per_kwh": round(kg * 1000 / kwh, 3) if kwh else None,
        "hardware": ", ".join(str(x) for x in (getattr(data, "cpu_model", None), getattr(data, "gpu_model", None))
                              if x),
    }
    if tokens:
        out["tokens"] = int(tokens)
        out["energy_j_per_1k_tokens"] = round(out["energy_j"] * 1000 / tokens, 6)
        out["co2eq_g_per_1k_tokens"] = round(out["co2eq_g"] * 1000 / tokens, 9)
    return out


def describe(report: dict[str, Any] | None) -> str:
    """One line for the run summary."""
    if not report:
        return "energy: not measured"
    if not report.get("measured"):
        return f"energy: not measured ({report.get('why')})"
    line = (f"energy: {report['energy_j']:.0f} J ({report['energy_kwh']:.2e} kWh), {report['co2eq_g']:.3f} g "
            f"CO2eq at {report['grid_g_per_kwh']} g/kWh ({report['country_iso_code']})")
    if "energy_j_per_1k_tokens" in report:
        line += f", {report['energy_j_per_1k_tokens']:.1f} J per 1k tokens"
    return line + f"; {report['method']}"
