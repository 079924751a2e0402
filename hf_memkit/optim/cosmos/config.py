from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...config_types import Betas, MAX_RANK
from ...technique import TechniqueConfig
from ...optimizer_slot.release.config import ReleaseClipping, clipping_field, release_field


class CosmosConfig(TechniqueConfig):
    """``optimizer: {cosmos: {}}`` — COSMOS: SOAP in the leading rank-r eigensubspace of EMA(GᵀG) plus Muon
    (Newton–Schulz orthogonalisation) on the residual, for the hidden 2-D weights; AdamW for embeddings, the
    output head and 1-D parameters.

    ```yaml
    optimizer: {cosmos: {rank: 64, lr_ratio: 0.2, betas: [0.95, 0.95]}}
    training_args: {learning_rate: 2.0e-3, weight_decay: 0.1}
    ```
    Paper: Liu et al., "COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of LLMs" (2025); code
    lliu606/COSMOS (the README recommends lr 2e-3, betas (0.95, 0.95), weight decay 0.1, lr_ratio 0.2; the
    defaults below are the reference constructor's). Plain PyTorch equivalent:
    ``hf_memkit.optim.Cosmos(model, lr, betas, eps, weight_decay, rank, gamma, lr_ratio)`` — there is no
    torch built-in. State per m×n hidden matrix is mn + mr + nr + r² fp32 elements (AdamW: 2mn), about 0.6×
    AdamW's at rank 64 on SmolLM2-sized layers. Each hidden step has per-element RMS ``lr·lr_ratio``.

    Not for: adapters (LoRA trains tiny matrices; use AdamW), DeepSpeed/FSDP (the update needs whole matrices),
    or matrices narrower than the rank (the SOAP part then covers everything and COSMOS reduces to a
    normalised SOAP step with full-size state).

    Gradient release (``gradient_release: true``, :mod:`hf_memkit.optimizer_slot.release`): supported and exact, each
    hidden matrix's update reads only its own gradient and state (M, P, S, Vsq), the rest is AdamW; clipping
    becomes per-parameter.
    """

    lr: float | None = Field(None, gt=0, description="AdamW-path learning rate (hidden matrices use lr·lr_ratio); "
                             "null takes TrainingArguments.learning_rate")
    betas: Betas = Field((0.9, 0.999), description="β1 (momentum) and β2 (EMA of GᵀG and of the "
                                       "second moment in the subspace)")
    eps: float = Field(1e-8, gt=0, description="added to the second-moment root")
    weight_decay: float | None = Field(None, ge=0, description="decoupled weight decay W ← W·(1 − lr·wd); null "
                                       "takes TrainingArguments.weight_decay")
    rank: int = Field(64, ge=1, le=MAX_RANK, description="dimension r of the SOAP eigensubspace (clipped to min(m, n))")
    gamma: float = Field(0.2, ge=0, description="weight of the Muon (residual) part relative to the SOAP part")
    lr_ratio: float = Field(0.1, gt=0, description="hidden-matrix step RMS / lr (the reference's lr_ratio)")
    nesterov: bool = Field(True, description="Nesterov-style momentum (the reference default)")
    ns_steps: int = Field(5, ge=1, description="Newton–Schulz iterations on the residual")
    ns_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the Newton–Schulz matmuls; auto: bfloat16 on CUDA (as the reference), "
        "float32 elsewhere")
    gradient_release: bool = release_field()
    release_clipping: ReleaseClipping = clipping_field()
