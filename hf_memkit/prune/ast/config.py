"""See the class docstring for the recipe key, the paper and when (not) to use it."""
from __future__ import annotations

from pydantic import Field

from ...config_types import Betas
from ..sparse_training import SparseTrainingFields


class ASTConfig(SparseTrainingFields):
    """``optimizer: {ast: {}}`` — Adaptive Sparse Trainer: train a dense model into exact 2:4 sparsity.

    ```yaml
    optimizer: {ast: {decay: 6.0e-5, mask_interval: 10, kl_weight: 0.67, task_weight: 0.33, temperature: 2.0}}
    export: {format: compressed-tensors}
    ```
    Reference: Huang et al., "Pruning Large Language Models with Semi-Structural Adaptive Sparse Training",
    AAAI 2025 (arXiv 2407.20584), code thu-ml/Adaptive-Sparse-Trainer. Every Linear (not lm_head) runs with
    ``W ⊙ M`` (2 of every 4 inputs kept by ``|W|``), gradients pass straight through to the pruned weights, the
    masks are recomputed every ``mask_interval`` steps, pruned weights feel an annealed decay inside AdamW, and
    the loss adds KL distillation from a frozen dense copy. Plain PyTorch equivalent, per step:
    ``M = topk2of4(|W|); y = x @ (W*M).T  # backward: dW = dL/d(W*M)``;
    ``m = b1*m + (1-b1)*g; u = m + lam_t*(1-M)*W; v = b2*v + (1-b2)*u**2; W -= lr*u/((sqrt(v/bc2)+eps)*bc1)``.
    With ``slorb: true`` each layer gains the SLoRB branch ``S·(P·x)`` (``in/k`` extra columns per row), saved
    as a PEFT LoRA in ``slorb_adapter/``.

    Not for: LoRA/QLoRA runs (it trains the base weights; use an adapter-free recipe), sharded training, or a
    loss technique that drops the logits (cce) while distilling; one-shot 2:4 (wanda_24) costs no training and
    is the baseline to beat.
    """

    # redeclared from SparseTrainingFields to bound each β to [0, 1)
    betas: Betas = Field((0.9, 0.999), description="Adam β1, β2")
    decay: float = Field(6e-5, ge=0, description="λ: the decay strength on pruned weights (AST's code default; "
                         "the GPT-2 README uses 1e-4)")
    decay_ramp: float = Field(0.25, gt=0, le=1, description="fraction of the run over which λ_t ramps linearly "
                              "from 0 to λ (10k of 40k steps in the GPT-2 run)")
    task_weight: float = Field(0.33, ge=0, description="weight of the task cross-entropy")
    kl_weight: float = Field(0.67, ge=0, description="weight of the KL distillation from the dense teacher "
                             "(0 = no teacher, no extra memory)")
    temperature: float = Field(2.0, gt=0, description="distillation temperature T (the KL is scaled by T²)")
    slorb: bool = Field(False, description="add the SLoRB side branch (exported as a PEFT LoRA)")
    slorb_k: int = Field(16, ge=1, description="SLoRB group size k: one extra weight per row per k inputs")
