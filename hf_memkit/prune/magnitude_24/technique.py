from __future__ import annotations

from typing import ClassVar

from ..base import PruneTechnique
from .config import Magnitude24Config


class Magnitude24Technique(PruneTechnique):
    name: ClassVar[str] = "magnitude_24"
    config_cls = Magnitude24Config
    leaves_nm: ClassVar[bool] = True
    summary: ClassVar[str] = "one-shot 2:4 pruning by |W| (keep 2 of every 4 inputs), no calibration"
    reference: ClassVar[str] = "magnitude N:M baseline (Mishra et al. 2021, NVIDIA ASP)"
