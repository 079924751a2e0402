from __future__ import annotations

from pydantic import Field, field_validator

from ...technique import TechniqueConfig


class WtaCrsConfig(TechniqueConfig):
    """``activations: [{wta_crs: {}}]`` — the chosen Linear layers compute their weight gradient from k = ratio·N of
    the N token rows, and save only those rows for backward. Forward output, input gradient and bias gradient are
    exact; the weight gradient is an unbiased estimate.

    ```yaml
    activations: [{wta_crs: {ratio: 0.3, targets: [o_proj, gate_proj, up_proj, down_proj]}}]
    ```
    Paper: Liu et al., "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language Model"
    (NeurIPS 2023; zirui-ray-liu/WTACRS). The rows with the largest probabilities (∝ ‖X_i‖) are kept
    deterministically, the rest are sampled with replacement and reweighted (winner-take-all column-row
    sampling), which has lower variance than plain column-row sampling when a few rows dominate. Plain PyTorch
    equivalent: a custom ``autograd.Function`` whose forward is ``F.linear(x, W, b)`` and which saves
    ``x[idx] / (k·p[idx])`` for ``idx = torch.multinomial(p, k)``; backward ``grad_W = g[idx].T @ saved``.

    Not for: tiny batches (k is at least ``min_k`` rows, so nothing is saved below that); layers whose weight is
    frozen (LoRA base layers: nothing to estimate — target the adapters' own Linears instead); runs that need
    exact gradients. The q/k/v projections are left exact by default, as in the paper.
    """

    ratio: float = Field(0.3, description="k/N: the fraction of token rows kept for each weight gradient, in (0, 1]")
    targets: list[str] = Field(
        ["o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers to sample, by name or name suffix (e.g. mlp.down_proj); each must match a "
        "Linear of the model",
    )
    min_k: int = Field(10, ge=1, description="never keep fewer rows than this")
    winners: bool = Field(True, description="keep the winners deterministically (WTA-CRS); false = plain "
                          "column-row sampling")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not (0 < v <= 1):
            raise ValueError(f"ratio={v} is outside (0, 1]: it is the fraction of token rows kept, e.g. 0.3")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("targets is empty; name at least one Linear layer (e.g. down_proj)")
        return v
