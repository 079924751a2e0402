"""transformers' hub kernels against per-instance patches.

Since transformers 5.25 (with the ``kernels`` package it now requires) a loaded model has ``use_kernels`` on by
default, and every ``model.train()`` / ``model.eval()`` that changes the kernel mode re-runs ``kernelize``. For
each module whose class carries ``@use_kernel_forward_from_hub`` (Llama's RMSNorm, ...) kernelize *deletes the
instance attribute* ``forward`` to restore the class's, which silently undid every hf_memkit patch that sets an
instance ``forward`` (Mesa's 8-bit RMSNorm first: measured on the tiny Llama, saved activations went from 31% to
49% of fp32 with nothing in the log). The Trainer calls ``model.train()`` at every step, so the patch was lost
at the first step.

A model a technique patches therefore gets its hub kernels switched off first (the torch forwards, which is
what the techniques were written against and what kernelize falls back to on CPU anyway), and the log says so.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

logger = logging.getLogger("hf_memkit")


def _kernel_owner(model: Any) -> Any:
    """The transformers PreTrainedModel inside ``model`` (itself, or the one a PeftModel or other wrapper holds)."""
    modules = model.modules() if hasattr(model, "modules") else ()
    return next((m for m in modules if hasattr(type(m), "use_kernels") and hasattr(m, "reset_kernels")), None)


def disable_hub_kernels(model: Any, reason: str) -> "Callable[[], None] | None":
    """Switch transformers' hub kernels off on ``model`` before it is patched, so that later ``train()``/
    ``eval()`` calls do not re-kernelize and strip instance ``forward`` patches. Returns a function that turns
    them back on (call it after the patches are removed), or None when they were off already."""
    owner = _kernel_owner(model)
    if owner is None or not getattr(owner, "use_kernels", False):
        return None
    owner.reset_kernels()  # restores the torch forwards and clears use_kernels / kernels_mode
    if getattr(owner, "use_kernels", False):  # a transformers whose reset leaves the flag set
        owner._use_kernels = False
    logger.info("hf_memkit: transformers hub kernels turned off on %s: %s", type(owner).__name__, reason)

    def restore() -> None:
        owner.use_kernels = True

    return restore
