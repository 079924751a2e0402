from __future__ import annotations

from typing import ClassVar

from ..base import PruneTechnique
from .config import Wanda24Config


class Wanda24Technique(PruneTechnique):
    name: ClassVar[str] = "wanda_24"
    config_cls = Wanda24Config
    leaves_nm: ClassVar[bool] = True
    calibrated: ClassVar[bool] = True
    summary: ClassVar[str] = "one-shot 2:4 pruning by |W|·‖X_j‖ on calibration text (Wanda)"
    reference: ClassVar[str] = "Sun et al., ICLR 2024 (Wanda), arXiv 2306.11695"
