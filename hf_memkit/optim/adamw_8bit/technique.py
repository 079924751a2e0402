from __future__ import annotations

from typing import Any, ClassVar

from ...errors import RecipeError
from ...optimizer_slot.technique import OptimizerTechnique
from .config import AdamW8bitConfig

BLOCK = 256  # bitsandbytes' block size for optimizer-state quantization


class AdamW8bitTechnique(OptimizerTechnique):
    name: ClassVar[str] = "adamw_8bit"
    config_cls = AdamW8bitConfig
    state_description: ClassVar[str] = "8-bit block-wise moments (~2 bytes/param)"
    summary: ClassVar[str] = "bitsandbytes block-wise 8-bit AdamW (~2 bytes/param of state)"
    reference: ClassVar[str] = "Dettmers et al. 2022; bitsandbytes.optim.AdamW8bit"

    def validate(self, ctx) -> None:
        super().validate(ctx)
        if self.config.paged:
            import torch

            if not torch.cuda.is_available():
                raise RecipeError(
                    "paged optimizer state needs CUDA unified memory and no GPU is visible",
                    path=getattr(ctx.recipe, "source", None),
                    key="optimizer.adamw_8bit.paged",
                    fix="set `paged: false` on this machine",
                )

    def create_optimizer(self, model: Any, args: Any):
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
            raise RecipeError(
                f"bitsandbytes is not importable ({exc})",
                key="optimizer.adamw_8bit",
                fix="pip install bitsandbytes",
            ) from exc
        hp = self.hyperparameters(args)
        cfg = self.config
        cls = bnb.optim.PagedAdamW8bit if cfg.paged else bnb.optim.AdamW8bit
        return cls(
            self.param_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=cfg.betas, eps=cfg.eps,
            min_8bit_size=cfg.min_8bit_size,
        )

    def estimate(self, mem: Any) -> None:
        total, quantized = 0, False
        for p in mem.trainable():
            if p.numel >= self.config.min_8bit_size:
                blocks = -(-p.numel // BLOCK)
                total += 2 * p.numel + 2 * 4 * blocks  # uint8 moments + one fp32 absmax per block each
                quantized = True
            else:
                total += 8 * p.numel
        if quantized:
            total += 2 * 256 * 4  # the two dynamic quantization maps, shared by every tensor
        mem.add("optimizer_states", total, self.name, "uint8 moments + fp32 absmax per 256")
        self.estimate_gradient_release(mem)
