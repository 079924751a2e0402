"""See the class docstring for the recipe key, the paper and when (not) to use it."""
from __future__ import annotations

from pydantic import Field

from ...config_types import Betas
from ..sparse_training import SparseTrainingFields


class CASTConfig(SparseTrainingFields):
    """``optimizer: {cast: {}}`` — Continuous Adaptive Sparse Trainer: AdamS + weight scaling + distillation,
    then an exact 2:4 projection.

    ```yaml
    optimizer: {cast: {decay: 1.0e-4, mask_interval: 10, scale_groups: 2, kl_weight: 0.333}}
    export: {format: compressed-tensors}
    ```
    Reference: Huang, Hu, Zhu, Chen, "CAST", arXiv 2509.25996 (preprint; no public code). The method details
    follow a third-party reimplementation that cites the paper's equations (``comp_cast_sst.md`` §2) and are
    unverified against the PDF. Choices where the sources disagree or are silent: the KL has a temperature
    (default 1.0 = Eq. 13, which has none; AST uses 2) and ``T²`` scaling; the mask is recomputed from
    ``|W ⊙ A|`` (equal to ``|W|``-ranking when a scaling group spans whole groups of 4); the final mask is
    recomputed from the trained weights, then ``W ← (W ⊙ M) ⊙ A``; the scaling groups get plain Adam without
    weight decay; β and ε default to torch's. The forward stays dense during training (Fig. 2).
    Plain PyTorch equivalent of AdamS, per step: ``m = b1*m + (1-b1)*g; a = t/T;
    mt = where(M, m, (1-a)*m + a*lam*sign(W)); v = b2*v + (1-b2)*mt**2; W -= lr*(mt/bc1)/(sqrt(v/bc2)+eps)``.

    Not for: adapter runs, sharded weights (the paper's authors warn against FSDP), or a loss technique that
    drops logits (cce) while distilling. In bf16 keep fp32 master weights (λ is below bf16 resolution).
    """

    # redeclared from SparseTrainingFields to bound each β to [0, 1)
    betas: Betas = Field((0.9, 0.999), description="Adam β1, β2")
    decay: float = Field(1e-4, ge=0, description="λ: the L1 decay blended into the first moment of pruned weights "
                         "(same order as the gradient; 4e-7 for LLaMA2-7B)")
    scale_groups: int = Field(2, ge=1, description="n: learnable scalars per weight row (column groups), folded "
                              "into the weights at the end")
    kl_weight: float = Field(1 / 3, ge=0, le=1, description="η: loss = η·KL + (1−η)·CE (0 = no teacher)")
    temperature: float = Field(1.0, gt=0, description="distillation temperature (Eq. 13 has none: 1.0)")
