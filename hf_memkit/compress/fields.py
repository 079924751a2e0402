"""Config fields shared by the quantization techniques (pydantic only: importing this stays cheap)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..technique import TechniqueConfig
from .grid import QuantSpec


class WeightQuantFields(TechniqueConfig):
    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight: 2, 3, 4 or 8")
    group_size: int | None = Field(
        128, ge=1, description="input columns sharing one scale/zero point; must divide every quantized layer's "
        "input width; null = one group per output channel",
    )
    symmetric: bool = Field(False, description="symmetric grid (no zero point stored) instead of asymmetric")
    skip_modules: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="Linear modules (by name or name suffix) kept in full "
        "precision",
    )

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


class CalibrationFields(TechniqueConfig):
    calibration: Literal["auto", "train", "corpus"] = Field(
        "auto", description="calibration text: the run's training data (train), the embedded corpus (corpus), or "
        "the training data when there is one, else the corpus (auto)",
    )
    num_samples: int = Field(128, ge=1, description="calibration sequences")
    seq_len: int = Field(512, ge=8, description="tokens per calibration sequence")
