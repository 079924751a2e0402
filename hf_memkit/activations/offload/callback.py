"""Says what the offload did (bytes written per step) and removes its temporary folder when training ends."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("hf_memkit")
MIB = 2**20


class OffloadReportCallback(TrainerCallback):
    def __init__(self, technique: Any):
        self.technique = technique
        self.steps = 0

    def _store(self) -> Any:
        return self.technique.store

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps += 1
        store = self._store()
        if self.steps == 1 and store is not None and args.should_log:
            logger.info("hf_memkit: offload: step %d wrote %.1f MiB of saved tensors", state.global_step,
                        store.bytes_written / MIB)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        store = self._store()
        if store is None:
            return
        if self.steps and args.should_log:
            logger.info("hf_memkit: offload: %.1f MiB of saved tensors per step over %d steps (%.1f MiB in all)",
                        store.bytes_written / self.steps / MIB, self.steps, store.bytes_written / MIB)
        store.release()
