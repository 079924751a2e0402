from __future__ import annotations

from pydantic import Field

from ...config_types import Betas, MAX_RANK
from ...technique import TechniqueConfig
from ...optimizer_slot.release.config import ReleaseClipping, clipping_field, release_field


class FiraConfig(TechniqueConfig):
    """``optimizer: {fira: {}}`` — Fira: GaLore-style low-rank Adam on the projected gradient plus the full-rank
    residual, scaled by the low-rank Adam's norm ratio and capped by a norm-growth limiter.

    ```yaml
    optimizer: {fira: {rank: 64, update_proj_gap: 200, alpha: 0.25, target_modules: [q_proj, v_proj, up_proj, down_proj]}}
    training_args: {learning_rate: 1.0e-2, max_grad_norm: 1.0}
    ```
    Paper: Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?" (2024);
    code xichen-fy/Fira (published pre-training scripts: lr 1e-2, alpha 0.25, gap 200). Plain PyTorch
    equivalent: ``hf_memkit.optim.Fira([{"params": others}, {"params": matrices, "fira": True}], lr, rank=...)``
    (no torch built-in; GaLore without the residual is ``galore_torch.GaLoreAdamW``). State per projected m×n
    matrix: 2·max(m,n)·r + min(m,n)·r + 1 fp32 elements (AdamW: 2mn).

    Not for: adapters (nothing full-rank to project), DeepSpeed/FSDP (the SVD needs whole gradients), or very
    short fine-tunes where the per-gap SVD costs more than the memory saved is worth.

    Gradient release (``gradient_release: true``, :mod:`hf_memkit.optimizer_slot.release`): supported and exact, the
    projection, the low-rank moments and the limiter's norm belong to one matrix. Clipping becomes per-parameter
    (the recipe above clips globally to 1.0; with release each matrix is clipped to 1.0 on its own).
    """

    lr: float | None = Field(None, gt=0, description="learning rate; null takes TrainingArguments.learning_rate")
    betas: Betas = Field((0.9, 0.999), description="decay rates of the low-rank Adam moments")
    eps: float = Field(1e-6, gt=0, description="added to the second-moment root (the reference's 1e-6)")
    weight_decay: float | None = Field(None, ge=0, description="decoupled weight decay; null takes "
                                       "TrainingArguments.weight_decay")
    rank: int = Field(64, ge=1, le=MAX_RANK, description="projection rank r (clipped to min(m, n))")
    update_proj_gap: int = Field(200, ge=1, description="steps between projection refreshes (SVD of the gradient)")
    alpha: float = Field(0.25, gt=0, description="scale of the projected-back low-rank update (GaLore's scale)")
    limiter: float = Field(1.01, ge=1, description="γ of the norm-growth limiter: ‖S_t‖ ≤ γ·‖S_t-1‖")
    target_modules: str | list[str] = Field(
        "all-linear", description="projected Linear layers, as in PEFT: a list of module names matched whole or "
        "as '.'-suffixes (q_proj), a regex over whole module names, or 'all-linear' (every nn.Linear but the "
        "output head)")
    gradient_release: bool = release_field()
    release_clipping: ReleaseClipping = clipping_field()
