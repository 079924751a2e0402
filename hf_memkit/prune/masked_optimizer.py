"""The parameter routing AST's AdamW and CAST's AdamS share: a masked weight gets the method's update, every other
parameter (embeddings, norms, unmasked layers, CAST's scaling groups) plain AdamW."""

from __future__ import annotations

from typing import Any

import torch

from ..optimizer_slot.fp32_adamw import FP32StateOptimizer


class MaskedWeightOptimizer(FP32StateOptimizer):
    """``owners`` maps ``id(param)`` of each masked weight to its Linear, whose ``sparse_mask`` buffer is the live
    mask (refreshed by the technique's callback, so it is read at every step). Subclasses implement
    :meth:`masked_step_` with both moments allocated."""

    def __init__(self, params, owners: dict[int, Any], defaults: dict[str, Any]):
        super().__init__(params, defaults)
        self.owners = owners

    def param_step_(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        owner = self.owners.get(id(p))
        if owner is None:
            self.adamw_param_(p, state, group)
            return
        self.init_moments_(p, state)
        self.masked_step_(p, owner.sparse_mask, state, group)

    def masked_step_(self, p: torch.Tensor, mask: torch.Tensor, state: dict[str, Any],
                     group: dict[str, Any]) -> None:
        raise NotImplementedError
