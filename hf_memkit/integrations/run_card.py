"""The card of a model a script saves with a recipe applied (``trainer.save_model()`` after ``train()``), and the
energy measurement such a run takes when ``HF_MEMKIT_ENERGY`` is set (``1``: the default grid, or a three-letter
country code). ``memkit train`` measures energy always and writes a fuller card (:mod:`hf_memkit.train`)."""

from __future__ import annotations

import math
import os
from typing import Any

ENERGY_ENV = "HF_MEMKIT_ENERGY"


def _energy_country() -> str | None:
    value = os.environ.get(ENERGY_ENV, "").strip()
    if not value or value.lower() in ("0", "false", "no", "off"):
        return None
    from ..energy import DEFAULT_COUNTRY

    return value.upper() if len(value) == 3 and value.isalpha() else DEFAULT_COUNTRY


def energy_callback(runtime: Any) -> Any:
    """A callback measuring the run's energy into ``runtime.energy``, or None when ``HF_MEMKIT_ENERGY`` is unset."""
    country = _energy_country()
    if country is None:
        return None
    from transformers import TrainerCallback

    from ..energy import EnergyMeter

    class MemkitEnergyCallback(TrainerCallback):
        def __init__(self):
            self.meter = None

        def on_train_begin(self, args, state, control, **kw):
            self.meter = EnergyMeter(country).start()

        def on_train_end(self, args, state, control, **kw):
            if self.meter is not None:
                runtime.energy = self.meter.stop()
                self.meter = None

    return MemkitEnergyCallback()


def write_run_card(trainer: Any, runtime: Any, output_dir: str) -> None:
    from ..export.card import training_info, write_training_card
    from ..memory.profiler import peak_rss_bytes

    history = trainer.state.log_history
    seconds = next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None)
    eval_loss = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
    metrics = {"steps": trainer.state.global_step, "train_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(),
               "perplexity_after": math.exp(min(eval_loss, 50.0)) if eval_loss is not None else None}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
            metrics["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    except Exception:  # pragma: no cover - a CUDA query must not stop a save
        pass
    energy = runtime.energy
    if energy is None:
        energy = {"measured": False, "why": f"set {ENERGY_ENV}=1 (or a country code) to measure it with codecarbon"}
    info = training_info(trainer.model, runtime.recipe, metrics=metrics, energy=energy)
    write_training_card(output_dir, {**info, "written_by": "a script with an hf_memkit recipe"})
