from __future__ import annotations

from typing import Any, ClassVar

from ...technique import PatchHandle, Technique, ValidationContext
from .config import LoraConfigFields


def attach_lora(model: Any, fields: dict, technique: str) -> PatchHandle:
    """Wrap ``model`` in a PeftModel with a LoRA adapter; the handle's ``remove()`` unloads the adapter and
    restores the original ``requires_grad`` flags, returning the original model object."""
    from ...integrations.peft_utils import lora_config, wrap_with_peft

    config = lora_config(fields, technique)
    return wrap_with_peft(model, config, technique)


class LoraTechnique(Technique):
    name: ClassVar[str] = "lora"
    slot: ClassVar[str] = "adapter"
    config_cls = LoraConfigFields
    summary: ClassVar[str] = "PEFT LoRA adapter (frozen base, trainable low-rank A·B)"
    reference: ClassVar[str] = "Hu et al. 2021; peft.LoraConfig"

    def validate(self, ctx: ValidationContext) -> None:
        from ...integrations.peft_utils import lora_config

        lora_config(self.config.peft_kwargs(), f"adapter.{self.name}", source=getattr(ctx.recipe, "source", None))

    def patch_model(self, model: Any) -> PatchHandle:
        return attach_lora(model, self.config.peft_kwargs(), f"adapter.{self.name}")

    def estimate(self, mem: Any) -> None:
        from ...integrations.peft_utils import lora_param_shapes

        mem.freeze_all()
        for name, shape in lora_param_shapes(mem.model, self.config.peft_kwargs()):
            mem.add_param(name, shape, trainable=True, category="adapter_weights")

    def finalize(self, model: Any, output_dir: str) -> None:
        return None

