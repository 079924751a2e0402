from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...technique import TechniqueConfig


class DivergenceGuardConfig(TechniqueConfig):
    """``guard: [{divergence_guard: {}}]`` — stop a run (or skip the step) the moment it diverges, instead of
    training on and reporting a collapsed model. ``memkit train`` adds it with these defaults unless the recipe
    has its own or ``--no-divergence-guard`` is given.

    ```yaml
    guard: [{divergence_guard: {action: skip, spike_factor: 8.0}}]
    ```
    A step is *bad* when (1) a micro-batch loss is NaN or infinite, (2) it exceeds ``spike_factor`` times the
    median of the last ``window`` good steps' losses (once ``min_history`` steps are seen), (3) a gradient about
    to be applied is NaN or infinite, or (4) the gradients of every trainable parameter are exactly zero for
    ``vanished_steps`` steps in a row (a saturated, collapsed model: the loss sits at log(vocabulary size) and
    nothing can learn any more; normal training never gives an exactly zero gradient).

    ``action: stop`` raises :class:`hf_memkit.errors.DivergenceError` before the bad update is applied (the
    earlier checkpoints and the model in memory stay as they were); ``skip`` drops the step's gradients (the
    optimizer skips parameters without a gradient, the schedule moves on) and stops after ``max_skips`` bad
    steps in a row. Plain-PyTorch equivalent: ``if not torch.isfinite(loss): raise ...`` in the training loop.
    Not for: runs whose loss legitimately jumps (curriculum switches between very different data): raise
    ``spike_factor`` or turn the spike check off with ``spike_factor: 0``.
    """

    action: Literal["stop", "skip"] = Field("stop", description="stop: end the run with a clear error before the "
                                            "bad update; skip: drop the bad step's gradients and go on")
    spike_factor: float = Field(10.0, ge=0, description="a loss above this multiple of the running median is a "
                                "divergence; 0 turns the spike check off")
    window: int = Field(20, ge=1, le=100_000, description="good steps in the running median")
    min_history: int = Field(1, ge=1, le=100_000, description="good steps seen before the spike check starts")
    vanished_steps: int = Field(2, ge=0, le=100_000, description="steps in a row with an exactly zero gradient "
                                "that count as a collapse; 0 turns this check off")
    check_gradients: bool = Field(True, description="check the gradients before each optimizer step (one "
                                  "norm per parameter tensor)")
    max_skips: int = Field(5, ge=1, le=100_000, description="with action: skip, bad steps in a row before the "
                           "run stops anyway")
