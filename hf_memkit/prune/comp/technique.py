from __future__ import annotations

from typing import ClassVar

from ..base import PruneTechnique
from .config import COMPConfig


class COMPTechnique(PruneTechnique):
    name: ClassVar[str] = "comp"
    config_cls = COMPConfig
    rebuilds_modules: ClassVar[bool] = True  # drops layers, shrinks MLPs, edits the config
    calibrated: ClassVar[bool] = True
    summary: ClassVar[str] = "structured pruning after COMP: drop layers + MLP neurons, least-squares rescale"
    reference: ClassVar[str] = "after Xu et al. 2025, arXiv 2501.15255 (COMP; formulas not public, ours)"
