from __future__ import annotations

from typing import ClassVar

from ...compress.capabilities import QUANTIZER
from ...compress.technique import ADAPTER_CONFLICT
from ..technique import QuantizerTechnique
from .config import RTNConfig


class RTNTechnique(QuantizerTechnique):
    name: ClassVar[str] = "rtn"
    config_cls = RTNConfig
    role: ClassVar[str] = QUANTIZER
    keeps_nm: ClassVar[bool] = True  # a zero rounds to a zero code on an asymmetric grid that spans 0
    summary: ClassVar[str] = "round-to-nearest 2/3/4/8-bit weights (per channel or group), no calibration"
    reference: ClassVar[str] = "IST-DASLab/gptq quant.py (RTN baseline); ZeroQuant-V2 (Yao et al. 2023)"
    conflicts: ClassVar[dict[str, str]] = {
        "gptq": "one quantizer per recipe: gptq already rounds the weights",
        "block_ap": "one quantizer per recipe: block_ap already rounds the weights",
        "slot:adapter": ADAPTER_CONFLICT,
    }
