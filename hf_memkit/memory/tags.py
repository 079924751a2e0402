"""Marks that let the memory accounting attribute a tensor to the right category (no torch import here).

A fused op may form a parameter's gradient in its forward and save it for backward, where it is handed to
autograd unchanged (the Cut Cross-Entropy forward does this with lm_head's dC). Its storage then *becomes* the
parameter's ``.grad``, so the saved-activation meter must not count it: the gradient accounting already does,
and counting it in both categories would double count one buffer.
"""

from __future__ import annotations

from typing import Any

PARAMETER_GRADIENT_ATTR = "_memkit_parameter_gradient"


def mark_parameter_gradient(t: Any) -> None:
    """Tag ``t`` as a leaf parameter's gradient saved for backward."""
    setattr(t, PARAMETER_GRADIENT_ATTR, True)


def is_parameter_gradient(t: Any) -> bool:
    return bool(getattr(t, PARAMETER_GRADIENT_ATTR, False))
