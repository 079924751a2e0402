"""The TrainerCallback of :class:`~.technique.SparseUpdateTechnique` (imports transformers, so it is loaded only
when a run asks for callbacks)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class SparseUpdateCallback(TrainerCallback):
    """``on_train_begin``: budget mode measures and plans; every mode checks that the optimizer holds what
    trains."""

    def __init__(self, technique: Any):
        self.technique = technique

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self.technique.on_train_begin(args, model, optimizer, train_dataloader)
