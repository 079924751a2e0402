from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...technique import TechniqueConfig


class CO2Config(TechniqueConfig):
    """``distributed: {co2: {outer_interval: 20, outer_momentum: 0.2}}`` — CO2: each rank trains locally with its
    inner optimizer (no gradient all-reduce per step); every ``outer_interval`` steps the ranks' parameters are
    averaged by an *asynchronous* all-reduce that overlaps the next interval and is consumed one round late, then
    an outer momentum step moves the shared anchor θ_old:

        m ← β·m + (θ_old − θ̄)/λ ;  m ← clip(m, φ) ;  θ_old ← θ_old − α·m ;  θ ← θ_old

    ```yaml
    distributed: {co2: {outer_interval: 20, outer_lr: 1.0, outer_momentum: 0.2, staleness_penalty: 1.0, clip: 1.0}}
    distributed: {co2: {outer_interval: 1, outer_momentum: 0.0, asynchronous: false}}   # = synchronous DP-SGD
    ```
    Reference: Sun et al., CO2 (ICLR 2024), weigao266/fairscale-CO2. Plain PyTorch equivalent: local SGD with
    ``dist.all_reduce(flat_params, async_op=True)`` every τ steps and the update above. Unlike the reference,
    clipping really clips (the reference's ``torch.clamp`` result is discarded). θ_old and m are two fp32
    copies of the trainable parameters on every rank (the reference's sharding of them is not implemented).

    Not for: one process (nothing to average: CO2 then only applies the outer step to local progress);
    DeepSpeed/FSDP (one engine per run; CO2 runs on plain data-parallel ranks).
    """

    outer_interval: int = Field(20, ge=1, description="τ: local steps between outer steps")
    outer_lr: float = Field(1.0, gt=0, description="α: outer learning rate")
    outer_momentum: float = Field(0.2, ge=0, lt=1, description="β: outer momentum (the reference uses 0.0/0.2/"
                                  "0.5/0.6 for ≤16/≤32/≤64/more ranks)")
    staleness_penalty: float = Field(1.0, gt=0, description="λ: the outer update (θ_old − θ̄) is divided by it")
    clip: float | None = Field(1.0, gt=0, description="φ: clip the outer momentum; null = no clipping")
    clip_mode: Literal["value", "norm"] = Field("value", description="value = element-wise |m| ≤ φ, norm = "
                                                "‖m‖₂ over all parameters ≤ φ")
    asynchronous: bool = Field(True, description="overlap the all-reduce with the next interval (one-round "
                               "staleness); false = blocking average at each outer step")
