from __future__ import annotations

from typing import ClassVar

from ..base import PruneTechnique
from .config import L1StructuredConfig


class L1StructuredTechnique(PruneTechnique):
    name: ClassVar[str] = "l1_structured"
    config_cls = L1StructuredConfig
    rebuilds_modules: ClassVar[bool] = True  # drops layers, shrinks MLPs, edits the config
    summary: ClassVar[str] = "structured baseline: prune MLP neurons by L1 weight norm, no calibration"
    reference: ClassVar[str] = "Li et al. 2017 L1-norm channel pruning (LLM-Pruner's L1 baseline)"
