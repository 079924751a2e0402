"""``guard: [{divergence_guard: {...}}]``: the watcher in :mod:`.monitor`, wired as a technique (loss observed
through the runtime's ``observe_loss`` hook, gradients checked in a callback before each optimizer step)."""

from __future__ import annotations

from typing import Any, ClassVar

from ...technique import Technique
from .config import DivergenceGuardConfig
from .monitor import DivergenceMonitor


class DivergenceGuardTechnique(Technique):
    name: ClassVar[str] = "divergence_guard"
    slot: ClassVar[str] = "guard"
    config_cls = DivergenceGuardConfig
    summary: ClassVar[str] = ("divergence guard: NaN/Inf or spiking loss, NaN/Inf or vanished gradients stop "
                              "the run (or skip the step) before the bad update")
    reference: ClassVar[str] = "hf_memkit (cf. the loss-spike skipping of large-scale LM training runs)"

    def __init__(self, config: DivergenceGuardConfig | None = None):
        super().__init__(config)
        self.monitor = DivergenceMonitor(self.config)

    def observe_loss(self, loss: Any, step: int) -> None:
        self.monitor.observe_loss(loss, step)

    def callbacks(self) -> list:
        from .callback import DivergenceGuardCallback

        return [DivergenceGuardCallback(self.monitor)]
