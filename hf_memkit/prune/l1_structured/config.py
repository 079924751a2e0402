"""See the class docstring for the recipe key, the paper and when (not) to use it."""
from __future__ import annotations

from ..comp.config import StructuredFields


class L1StructuredConfig(StructuredFields):
    """``compress: [{l1_structured: {ratio: 0.2}}]`` — the L1-magnitude structured baseline: prune the same
    number of MLP neurons in every layer by ``‖gate_j‖₁ + ‖up_j‖₁ + ‖down_{:,j}‖₁``, no rescaling.

    ```yaml
    compress: [{l1_structured: {ratio: 0.2}}]
    ```
    Reference: the L1-norm channel pruning baseline (Li et al., "Pruning Filters for Efficient ConvNets", 2017;
    the L1 variant LLM-Pruner compares against). Plain PyTorch equivalent: ``s = gate.weight.abs().sum(1) +
    up.weight.abs().sum(1) + down.weight.abs().sum(0); keep = s.topk(I - k).indices.sort().values``. Needs no
    calibration data; the parameter budget is that of ``comp`` with ``layer_share: 0``.

    Not for: quality (it is the baseline ``comp`` is measured against).
    """
