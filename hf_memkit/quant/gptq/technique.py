from __future__ import annotations

from typing import ClassVar

from ...compress.capabilities import QUANTIZER
from ...compress.technique import ADAPTER_CONFLICT
from ..technique import QuantizerTechnique
from .config import GPTQConfig


class GPTQTechnique(QuantizerTechnique):
    name: ClassVar[str] = "gptq"
    config_cls = GPTQConfig
    role: ClassVar[str] = QUANTIZER
    calibrated: ClassVar[bool] = True
    summary: ClassVar[str] = "GPTQ: Hessian-aware 2/3/4/8-bit weights from calibration text, block by block"
    reference: ClassVar[str] = "Frantar et al. 2022 (ICLR 2023); IST-DASLab/gptq"
    conflicts: ClassVar[dict[str, str]] = {
        "rtn": "one quantizer per recipe: rtn already rounds the weights",
        "block_ap": "one quantizer per recipe: block_ap already rounds the weights",
        "slot:adapter": ADAPTER_CONFLICT,
    }
