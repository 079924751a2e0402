"""The Trainer side of the divergence guard: gradients are checked and bad steps dropped before the optimizer
step; the step's verdict is closed at its end."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .monitor import DivergenceMonitor


class DivergenceGuardCallback(TrainerCallback):
    def __init__(self, monitor: DivergenceMonitor):
        self.monitor = monitor

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                              **kwargs: Any) -> None:
        if optimizer is not None and optimizer.param_groups:
            self.monitor.learning_rate = optimizer.param_groups[0].get("lr")
        if model is not None and self.monitor.config.check_gradients:
            self.monitor.check_gradients((p.grad for p in model.parameters() if p.requires_grad), state.global_step)
        if self.monitor.before_update(state.global_step) and model is not None:
            model.zero_grad(set_to_none=True)  # optimizers skip parameters without a gradient

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor.end_step()
