from __future__ import annotations

from pydantic import Field

from ...config_types import Betas
from ...technique import TechniqueConfig
from ...optimizer_slot.release.config import ReleaseClipping, clipping_field, release_field


class AdamW8bitConfig(TechniqueConfig):
    """``optimizer: {adamw_8bit: {}}`` — bitsandbytes block-wise 8-bit AdamW (runs on CPU and GPU).

    ```yaml
    optimizer: {adamw_8bit: {lr: 1.0e-4}}
    ```
    Paper: Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022). Plain equivalent:
    ``bitsandbytes.optim.AdamW8bit(params, lr, betas, eps, weight_decay, min_8bit_size=4096)``. Moments of
    tensors with at least ``min_8bit_size`` elements are stored as uint8 with one fp32 absmax per 256 values
    (about 2 bytes/param instead of 8). Not for tiny models where every tensor is below ``min_8bit_size``
    (nothing is saved) nor where bit-exact reproducibility with fp32 AdamW is required.

    Gradient release (``gradient_release: true``, :mod:`hf_memkit.optimizer_slot.release`): supported and exact,
    bitsandbytes quantizes and updates each tensor's state on its own; clipping becomes per-parameter.
    """

    lr: float | None = Field(None, gt=0, description="learning rate; null takes TrainingArguments.learning_rate")
    betas: Betas = Field((0.9, 0.999), description="decay rates of the first and second moments")
    eps: float = Field(1e-8, gt=0, description="added to the denominator for numerical stability")
    weight_decay: float | None = Field(
        None, ge=0, description="decoupled weight decay; null takes TrainingArguments.weight_decay"
    )
    min_8bit_size: int = Field(4096, ge=1, description="tensors smaller than this keep fp32 moments")
    paged: bool = Field(False, description="paged (unified-memory) state; CUDA only")
    gradient_release: bool = release_field()
    release_clipping: ReleaseClipping = clipping_field()
