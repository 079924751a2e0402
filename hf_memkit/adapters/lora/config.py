from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from ...config_types import MAX_RANK, Rank
from ...technique import TechniqueConfig


class LoraConfigFields(TechniqueConfig):
    """``adapter: {lora: {}}`` — PEFT LoRA; the fields are PEFT ``LoraConfig`` fields with the same names.

    ```yaml
    adapter: {lora: {r: 16, lora_alpha: 32, target_modules: all-linear}}
    ```
    Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021). Plain equivalent:
    ``peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", ...))``. The base weights freeze, so
    gradients and optimizer state exist only for the small A·B factors. Not when the task needs the full
    capacity of the model (large domain shifts): use a full fine-tune with a lean optimizer instead.

    Only the commonly used LoraConfig fields are exposed; a test checks every one still exists in the
    installed PEFT.
    """

    r: int = Field(8, ge=1, le=MAX_RANK, description="rank of the update A·B")
    lora_alpha: int = Field(16, ge=1, description="scaling numerator: the update is scaled by lora_alpha / r")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | str = Field(
        "all-linear", description="module names or regex; 'all-linear' = every Linear except the output head"
    )
    exclude_modules: list[str] | str | None = Field(None, description="module names or regex to leave alone")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases train")
    use_rslora: bool = Field(False, description="scale by lora_alpha / sqrt(r) (rank-stabilised LoRA)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora", "orthogonal"] = Field(
        True, description="initialisation of A and B; true = B is zero so training starts at the base model"
    )
    modules_to_save: list[str] | None = Field(None, description="modules trained in full and saved with the adapter")
    layers_to_transform: list[NonNegativeInt] | NonNegativeInt | None = Field(
        None, description="only these decoder layer indices")
    rank_pattern: dict[str, Rank] = Field(default_factory=dict, description="per-module rank overrides (regex -> r)")
    alpha_pattern: dict[str, PositiveInt] = Field(default_factory=dict, description="per-module alpha overrides")

    def peft_kwargs(self) -> dict:
        return self.model_dump()
