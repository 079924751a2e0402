"""The CO2 outer step, as pure tensor arithmetic (unit-tested against a hand computation)."""

from __future__ import annotations

import torch


@torch.no_grad()
def clip_(m: torch.Tensor, clip: float | None, mode: str = "value") -> torch.Tensor:
    """Clip the outer momentum in place: element-wise to [-φ, φ], or rescale so ‖m‖₂ ≤ φ."""
    if clip is None:
        return m
    if mode == "value":
        return m.clamp_(-clip, clip)
    norm = float(m.norm())
    if norm > clip:
        m.mul_(clip / norm)
    return m


@torch.no_grad()
def outer_step_(anchor: torch.Tensor, momentum: torch.Tensor, averaged: torch.Tensor, *, lr: float, beta: float,
                penalty: float, clip: float | None, clip_mode: str = "value") -> torch.Tensor:
    """m ← β·m + (θ_old − θ̄)/λ ; m ← clip(m) ; θ_old ← θ_old − α·m.

    Updates ``anchor`` and ``momentum`` (flat fp32 tensors) in place and returns ``anchor``."""
    momentum.mul_(beta).add_((anchor - averaged) / penalty)
    clip_(momentum, clip, clip_mode)
    return anchor.sub_(momentum, alpha=lr)
