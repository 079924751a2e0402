"""The TrainerCallback that drives :class:`~.technique.LisaTechnique` (a separate module: it imports
transformers, which the technique module must not do at import time)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class LisaCallback(TrainerCallback):
    """``on_train_begin``: seed the sampler, draw (or restore) the active set, freeze the rest.
    ``on_step_begin`` (once per optimizer step, also under gradient accumulation): re-draw at multiples of K."""

    def __init__(self, technique: Any):
        self.technique = technique

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.technique.on_train_begin(args, state, optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.technique.on_step_begin(state, optimizer)
