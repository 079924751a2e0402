"""Gradient release: the optimizer step fused into backward, an option of the optimizer slot.

```yaml
optimizer: {adamw: {gradient_release: true}}          # also adamw_8bit, cosmos, fira; not sst
training_args: {max_grad_norm: 1.0}                    # clipped per parameter, see below
```

Each parameter steps the moment its gradient is complete (a ``post_accumulate_grad`` hook) and the gradient is
freed at once, so a full fine-tune holds about one tensor's gradient instead of all of them. The result equals
the plain step for optimizers whose update of a parameter reads only that parameter's gradient and state:

* ``adamw``, ``adamw_8bit``: element-wise per tensor (bitsandbytes quantizes each tensor's state on its own);
* ``cosmos``, ``fira``: per-matrix projections and state (COSMOS' eigenbasis, Fira's projection and limiter
  norm belong to one weight), AdamW for the rest;
* ``sst`` refuses: its step ends with a step-wide epilogue (a global step counter, the warm-up of the sampled
  pairs, every ``interval`` steps a re-SVD of each layer that rewrites Σ, U and V together and resets their
  moments), which must run once after every parameter stepped.

What differs from a plain step, never silently:

* gradient accumulation — hooks keep the gradients on the non-final micro-batches (the Trainer's
  ``accelerator.gradient_state.sync_gradients``) and step+free them on the final one: the same result, and
  every gradient alive between micro-batches (no saving);
* clipping — the global norm is known only after the last gradient, when the others are already applied.
  ``release_clipping: per_parameter`` (default) clips each parameter's gradient to ``max_grad_norm`` on its own
  (logged at the start of the run); ``refuse`` raises unless ``max_grad_norm`` is 0. The Trainer's own clipping
  and norm are replaced: ``grad_norm`` in the logs is the true global pre-clip norm, from the per-parameter
  norms of the hooks;
* refused: fp16 (GradScaler must unscale and check every gradient before any step), DDP/DeepSpeed/FSDP/CO2
  (the hooks fire before the gradient all-reduce), the divergence guard's ``action: skip`` (the update is
  applied before the guard could drop it; ``action: stop`` still stops on a bad loss before its backward).

Release wraps the run's optimizer last, so it drives what other slots built (the precision slot's 16-bit
write-back steps one parameter at a time as well; with its stochastic rounding the draws come in backward order,
so they differ from a plain run's, not their distribution).

The inner optimizer keeps its state and param groups (the LR scheduler moves them, every hook reads the lr of
the moment), and ``state_dict()`` is its own: checkpoints resume with or without release.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GradientRelease", "find_release"]


def __getattr__(name: str) -> Any:  # torch loads on first use: the registry imports this package without it
    if name in __all__:
        from . import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module 'hf_memkit.optimizer_slot.release' has no attribute {name!r}")
