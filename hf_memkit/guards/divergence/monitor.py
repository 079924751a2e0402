"""The divergence rules, free of the Trainer: feed it each micro-batch loss and each step's gradients."""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Any, Iterable

from ...errors import DivergenceError

logger = logging.getLogger("hf_memkit")


class DivergenceMonitor:
    def __init__(self, config: Any):
        self.config = config
        self.history: deque[float] = deque(maxlen=config.window)  # good steps' mean losses
        self._step_losses: list[float] = []
        self._bad: str | None = None  # why the current step is bad
        self.zero_steps = 0
        self.skips_in_a_row = 0
        self.skipped: list[int] = []
        self.learning_rate: float | None = None

    # --- rules ---------------------------------------------------------------------------------------------
    def observe_loss(self, loss: Any, step: int) -> None:
        value = float(loss.detach().float().item()) if hasattr(loss, "detach") else float(loss)
        self._step_losses.append(value)
        if not math.isfinite(value):
            self._flag(step + 1, f"the loss is {value}")
            return
        factor = self.config.spike_factor
        if factor and len(self.history) >= self.config.min_history:
            median = statistics.median(self.history)
            if median > 0 and value > factor * median:
                self._flag(step + 1, f"the loss {value:.4g} is {value / median:.1f}x the running median "
                           f"{median:.4g} of the last {len(self.history)} steps (spike_factor {factor:g})")

    def check_gradients(self, grads: Iterable[Any], step: int) -> None:
        import torch

        grads = [g for g in grads if g is not None]
        if not grads or self._bad:
            return
        norms = torch._foreach_norm(grads)  # one small kernel per tensor, no concatenated copy
        total = torch.stack([n.float() for n in norms]).norm().item()
        if not math.isfinite(total):
            self._flag(step + 1, f"the gradient norm is {total}")
        elif total == 0.0 and self.config.vanished_steps:
            self.zero_steps += 1
            if self.zero_steps >= self.config.vanished_steps:
                self._flag(step + 1, f"every gradient has been exactly zero for {self.zero_steps} steps (the "
                           "model has collapsed: it predicts the same distribution whatever the input)")
        else:
            self.zero_steps = 0

    # --- step boundaries -------------------------------------------------------------------------------------
    def before_update(self, step: int) -> bool:
        """Called before the optimizer step: True when this step's gradients must be dropped (action: skip)."""
        if not self._bad:
            return False
        if self.config.action == "stop" or self.skips_in_a_row + 1 > self.config.max_skips:
            raise DivergenceError(self._message(step + 1))
        self.skips_in_a_row += 1
        self.skipped.append(step + 1)
        logger.warning("hf_memkit: divergence guard skipped step %d: %s (%d bad steps in a row, the run stops "
                       "after %d)", step + 1, self._bad, self.skips_in_a_row, self.config.max_skips)
        return True

    def end_step(self) -> None:
        if not self._bad and self._step_losses:
            self.history.append(sum(self._step_losses) / len(self._step_losses))
            self.skips_in_a_row = 0
        self._step_losses, self._bad = [], None

    # --- messages ----------------------------------------------------------------------------------------------
    def _flag(self, step: int, why: str) -> None:
        if self._bad:
            return
        self._bad = why
        if self.config.action == "stop":
            raise DivergenceError(self._message(step))

    def _message(self, step: int) -> str:
        lr = f" ({self.learning_rate:g})" if self.learning_rate is not None else ""
        skipped = f" after skipping {self.skips_in_a_row} bad steps in a row" if self.skips_in_a_row else ""
        return (f"training diverged at step {step}{skipped}: {self._bad}. Likely cause: the learning rate{lr} is "
                "too high for this model and recipe (or fp16 overflow). Fix: lower learning_rate (try 10x lower), "
                "set max_grad_norm (e.g. 1.0) or add warmup_steps; resume from the last checkpoint. To go on "
                "anyway: guard: [{divergence_guard: {action: skip}}], or --no-divergence-guard in memkit train")
