from __future__ import annotations

from pydantic import Field

from ...config_types import Betas
from ...technique import TechniqueConfig
from ...optimizer_slot.release.config import ReleaseClipping, clipping_field, release_field


class AdamWConfig(TechniqueConfig):
    """``optimizer: {adamw: {}}`` — torch.optim.AdamW, the reference every other optimizer is measured against.

    ```yaml
    optimizer: {adamw: {lr: 2.0e-4, betas: [0.9, 0.95]}}
    ```
    Paper: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019). Plain PyTorch equivalent:
    ``torch.optim.AdamW(params, lr, betas, eps, weight_decay)``. Not for memory-tight full fine-tunes: it keeps
    8 bytes of state per trainable parameter (use ``adamw_8bit`` or an adapter).

    Gradient release (``gradient_release: true``, :mod:`hf_memkit.optimizer_slot.release`): supported and exact, AdamW
    updates each tensor from its own gradient and moments; clipping becomes per-parameter (see there).
    """

    lr: float | None = Field(None, gt=0, description="learning rate; null takes TrainingArguments.learning_rate")
    betas: Betas = Field((0.9, 0.999), description="decay rates of the first and second moments")
    eps: float = Field(1e-8, gt=0, description="added to the denominator for numerical stability")
    weight_decay: float | None = Field(
        None, ge=0, description="decoupled weight decay; null takes TrainingArguments.weight_decay"
    )
    foreach: bool | None = Field(None, description="use the multi-tensor implementation (null: torch decides)")
    gradient_release: bool = release_field()
    release_clipping: ReleaseClipping = clipping_field()
