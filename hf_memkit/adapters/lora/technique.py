from __future__ import annotations

from typing import Any, ClassVar

from ...technique import PatchHandle, Technique, ValidationContext
from .config import LoraConfigFields
from ...integrations.versions import PEFT


def attach_lora(model: Any, fields: dict, technique: str) -> PatchHandle:
    """Wrap ``model`` in a PeftModel with a LoRA adapter; the handle's ``remove()`` unloads the adapter and
    restores the original ``requires_grad`` flags, returning the original model object."""
    from ...integrations.peft_utils import lora_config, wrap_with_peft

    config = lora_config(fields, technique)
    return wrap_with_peft(model, config, technique)


def estimate_lora(mem: Any, fields: dict, dropout: float) -> None:
    """Freeze the base, add the A/B factors, and the tensors each adapter branch saves per token: with dropout,
    the dropped-out input and its mask (d·in each); without, the base input itself (the base layer's input
    is then kept even though its weight is frozen); and A's output (d·r) for B."""
    from ...integrations.peft_utils import lora_param_shapes

    mem.freeze_all()
    tokens = mem.batch_size * mem.seq_len
    branch = 0
    for name, shape in lora_param_shapes(mem.model, fields):
        mem.add_param(name, shape, trainable=True, category="adapter_weights")
        if ".lora_A." in name:
            r, fan_in = shape
            module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
            mem.adapter_branches.append((module, fan_in, r, dropout > 0))
            if dropout > 0:  # dropout keeps its output and its mask, both in the input's dtype
                branch += 2 * mem.dtype_bytes * fan_in
            else:
                mem.needs_input.add(module)
            branch += mem.dtype_bytes * r
    if mem.gradient_checkpointing:  # the branches live inside checkpointed layers: recomputed, not kept
        return
    mem.add("activations", branch * tokens, "lora", "adapter branches: dropout input + mask, A output")


class LoraTechnique(Technique):
    name: ClassVar[str] = "lora"
    slot: ClassVar[str] = "adapter"
    verified_with: ClassVar[dict[str, str]] = {"peft": PEFT}
    config_cls = LoraConfigFields
    summary: ClassVar[str] = "PEFT LoRA adapter (frozen base, trainable low-rank A·B)"
    reference: ClassVar[str] = "Hu et al. 2021; peft.LoraConfig"

    def validate(self, ctx: ValidationContext) -> None:
        from ...integrations.peft_utils import lora_config

        lora_config(self.config.peft_kwargs(), f"adapter.{self.name}", source=getattr(ctx.recipe, "source", None))

    def patch_model(self, model: Any) -> PatchHandle:
        return attach_lora(model, self.config.peft_kwargs(), f"adapter.{self.name}")

    def estimate(self, mem: Any) -> None:
        estimate_lora(mem, self.config.peft_kwargs(), self.config.lora_dropout)

    def describe(self, model: Any, optimizer: Any = None) -> str:
        from ...integrations.describe import adapter_line

        c = self.config
        return adapter_line(model, f"LoRA r={c.r} alpha={c.lora_alpha}")

    def finalize(self, model: Any, output_dir: str) -> None:
        return None

