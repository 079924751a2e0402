from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...technique import TechniqueConfig


class FSDPConfig(TechniqueConfig):
    """``distributed: {fsdp: {sharding: full_shard}}`` — PyTorch FSDP through the Trainer's own ``fsdp`` and
    ``fsdp_config`` arguments (accelerate builds the wrapper; nothing here replaces it). Decoder layers are the
    wrap units (``transformer_layer_cls_to_wrap`` from the model's ``_no_split_modules``).

    ```yaml
    distributed: {fsdp: {}}                                  # full_shard, auto_wrap by decoder layer
    distributed: {fsdp: {sharding: shard_grad_op, offload: true}}
    ```
    Launch with ``memkit run --nproc-per-node N script.py --memkit_recipe r.yaml ...``. Reference: Zhao et al.
    2023 (PyTorch FSDP). Plain PyTorch equivalent: ``TrainingArguments(..., fsdp="full_shard auto_wrap",
    fsdp_config={"transformer_layer_cls_to_wrap": [...]})``.

    Not for: techniques that read whole weights or replace ``lm_head``'s use (the recipe is refused, see the
    README's compatibility table); one process.
    """

    sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"] = Field(
        "full_shard", description="what is sharded: full_shard = parameters + gradients + optimizer state "
        "(ZeRO-3 like), shard_grad_op = gradients + optimizer state (ZeRO-2 like)")
    auto_wrap: bool = Field(True, description="wrap each decoder layer as its own FSDP unit")
    offload: bool = Field(False, description="keep parameters and gradients on the CPU between uses")
    use_orig_params: bool = Field(True, description="expose the original parameters (needed by optimizers "
                                  "with per-parameter groups and by frozen/trainable mixes such as LoRA)")
    fsdp_config: dict[str, Any] = Field(default_factory=dict, description="extra TrainingArguments.fsdp_config "
                                        "keys, merged over the ones above")
