from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...config_types import Betas, MAX_RANK
from ...technique import TechniqueConfig
from ...optimizer_slot.release.config import ReleaseClipping, clipping_field, release_field


class SSTConfig(TechniqueConfig):
    """``optimizer: {sst: {}}`` — Sparse Spectral Training: each selected Linear becomes U·diag(Σ)·Vᵀ (SVD of
    its weight); every Σ trains each step, r sampled singular-vector pairs per layer train with the enhanced
    gradient and are renormalised, pairs are re-drawn every ``interval`` steps and the layer is re-SVD'ed at
    the end of each round. Other parameters (embeddings, norms, head) train with AdamW.

    ```yaml
    optimizer: {sst: {rank: 64, interval: 200, distribution: mixed}}
    training_args: {learning_rate: 1.0e-3}
    ```
    Paper: Zhao, Zhang, Li, Liu, Cannistraci, "Sparse Spectral Training and Inference on Euclidean and
    Hyperbolic Neural Networks" (ICML 2025, arXiv 2405.15481). Plain PyTorch equivalent:
    ``handle = hf_memkit.optim.sst.layer.factorize_linears_(model, rank=64)`` then
    ``hf_memkit.optim.SST(model, lr=...)``; ``handle.remove()`` puts merged ``nn.Linear`` layers back.

    Checkpoints: the factored layers' ``state_dict`` is the merged weight, so every Trainer checkpoint and
    ``save_model`` output is a plain HF model (``from_pretrained`` needs no hf_memkit). The factors themselves
    travel in the checkpoint's ``memkit_state`` (about (m+n)·k values per layer) so that a resume continues the
    exact trajectory.

    Memory: parameters grow to (m+n+1)·k per layer (about 2× a square W) while gradients and Adam state exist
    only for Σ and the r active pairs: 2·((m+n)·r + k) fp32 state elements vs AdamW's 2mn. Not for: small
    fine-tunes where a LoRA of the same rank suffices (SST's weights cost more than LoRA's), layers narrower
    than the rank (every pair is always active: no saving), or runs shorter than one ``interval``.

    Gradient release: refused (``gradient_release: true`` is a RecipeError). SST's step ends with a step-wide
    epilogue: a global step counter drives the warm-up of the sampled pairs, and every ``interval`` steps each
    layer is re-SVD'ed (Σ, U and V rewritten together, their moments reset) and new pairs are drawn; that must run
    once after every parameter stepped, not once per parameter inside backward.
    """

    lr: float | None = Field(None, gt=0, description="learning rate; null takes TrainingArguments.learning_rate")
    betas: Betas = Field((0.9, 0.999), description="Adam decay rates")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    weight_decay: float | None = Field(None, ge=0, description="decoupled weight decay (applied to Σ and the "
                                       "AdamW parameters); null takes TrainingArguments.weight_decay")
    rank: int = Field(64, ge=1, le=MAX_RANK, description="r: singular-vector pairs trained per layer and iteration")
    interval: int = Field(200, ge=1, description="T3: steps per iteration (pairs are re-drawn after each)")
    iteration_warmup: int = Field(20, ge=0, description="steps of linear lr warm-up for the newly drawn pairs "
                                  "(their moments restart at zero)")
    iterations_per_round: int | None = Field(None, ge=1, description="iterations between re-SVDs; null: "
                                             "ceil(k/r) per layer")
    distribution: Literal["mixed", "proportional", "uniform"] = Field(
        "mixed", description="sampling distribution of the pairs: mixed ½(1/k + Σ_i/ΣΣ), proportional Σ_i/ΣΣ "
        "(the abstract's 'weighted by singular-value magnitude'), or uniform; sources disagree, see the spec")
    target_modules: str | list[str] = Field(
        "all-linear", description="factored Linear layers, as in PEFT: module names matched whole or as "
        "'.'-suffixes, a regex over whole names, or 'all-linear' (every nn.Linear but the output head)")
    seed: int = Field(0, ge=0, description="seed of the pair sampling (its own generator; the torch RNG is untouched)")
    gradient_release: bool = release_field()
    release_clipping: ReleaseClipping = clipping_field()
