from __future__ import annotations

from typing import ClassVar

from ...compress.capabilities import COMPENSATOR
from ...compress.technique import ADAPTER_CONFLICT, CompressTechnique
from .config import LorcCompensatorConfig


class LoRCTechnique(CompressTechnique):
    """Runs inside the quantizer's pass (per layer, while the full-precision weight is still at hand), so it
    has no pass of its own unless it is alone in the list (then it compensates RTN)."""

    name: ClassVar[str] = "lorc"
    config_cls = LorcCompensatorConfig
    role: ClassVar[str] = COMPENSATOR
    summary: ClassVar[str] = "LoRC: rank-r SVD compensation of the quantization error, exported as a LoRA adapter"
    reference: ClassVar[str] = "Yao et al. 2023, ZeroQuant-V2 §5 (arXiv 2303.08302)"
    conflicts: ClassVar[dict[str, str]] = {
        "e2e_qp": "e2e_qp trains the scales after the factors were fitted, so they would no longer match the error",
        "slot:adapter": ADAPTER_CONFLICT,
    }
