from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...config_types import MAX_RANK
from ...technique import TechniqueConfig


class LorcCompensatorConfig(TechniqueConfig):
    """``compress: [{gptq: {}}, {lorc: {}}]`` — LoRC: low-rank compensation of the quantization error.

    ```yaml
    compress: [{gptq: {bits: 4, group_size: 128}}, {lorc: {rank: 8, factor_bits: 8}}]
    export: {format: compressed-tensors}    # the factors are written beside it as a PEFT LoRA adapter
    ```
    Paper: Yao et al., "ZeroQuant-V2: Exploring Post-training Quantization in LLMs from Comprehensive Study to
    Low Rank Compensation" (2023), §5. Plain PyTorch equivalent, per quantized ``nn.Linear``:
    ``U, S, Vh = torch.linalg.svd(W - W_hat); A = U[:, :r] * S[:r].sqrt(); B = S[:r].sqrt()[:, None] * Vh[:r]``,
    then ``y = x @ W_hat.T + (x @ B.T) @ A.T``. Compensates the quantizer listed with it in ``compress``
    (rtn, gptq or block_ap, whatever their order in the list); alone, it compensates RTN with rtn's defaults.
    Costs ``rank · (in + out)`` extra values per layer (0.39% of a 4096x4096 layer at rank 8).

    Not for: runtimes that cannot run a LoRA adapter beside the quantized weights (the branch cannot be folded
    into the integer weights without leaving the grid); 8-bit weights (the error is already tiny); together
    with e2e_qp (its trained scales change the error the factors were fitted to).
    """

    rank: int = Field(8, ge=1, le=MAX_RANK,
                      description="rank m of the correction A·B (capped at min(in, out) per layer)")
    factor_bits: Literal[4, 8] | None = Field(
        None, description="round the factors to a per-row symmetric grid of this many bits (null = keep them in "
        "the model dtype). The PEFT adapter stores the rounded values in the model dtype",
    )
