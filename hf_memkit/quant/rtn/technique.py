from __future__ import annotations

from typing import ClassVar

from ..base import ADAPTER_CONFLICT, QUANTIZER, CompressTechnique
from .config import RTNConfig


class RTNTechnique(CompressTechnique):
    name: ClassVar[str] = "rtn"
    config_cls = RTNConfig
    role: ClassVar[str] = QUANTIZER
    summary: ClassVar[str] = "round-to-nearest 2/3/4/8-bit weights (per channel or group), no calibration"
    reference: ClassVar[str] = "IST-DASLab/gptq quant.py (RTN baseline); ZeroQuant-V2 (Yao et al. 2023)"
    conflicts: ClassVar[dict[str, str]] = {
        "gptq": "one quantizer per recipe: gptq already rounds the weights",
        "block_ap": "one quantizer per recipe: block_ap already rounds the weights",
        "slot:adapter": ADAPTER_CONFLICT,
    }
