from __future__ import annotations

from typing import Any, ClassVar

from ...technique import PatchHandle, Technique, ValidationContext
from .config import MixLoraFields
from ...integrations.versions import PEFT, TRANSFORMERS


def mixlora_config(fields: dict) -> Any:
    from .peft_config import MixLoraConfig

    return MixLoraConfig(task_type="CAUSAL_LM", **fields)


class MixLoraTechnique(Technique):
    name: ClassVar[str] = "mixlora"
    slot: ClassVar[str] = "adapter"
    verified_with: ClassVar[dict[str, str]] = {"transformers": TRANSFORMERS, "peft": PEFT}
    config_cls = MixLoraFields
    summary: ClassVar[str] = "MixLoRA: LoRA on attention + top-k router over LoRA experts sharing each frozen FFN"
    reference: ClassVar[str] = "Li et al. 2024 (TUDB-Labs MixLoRA); PEFT type MIXLORA"

    def validate(self, ctx: ValidationContext) -> None:
        mixlora_config(self.config.peft_kwargs())

    def patch_model(self, model: Any) -> PatchHandle:
        from ...integrations.peft_utils import wrap_with_peft

        return wrap_with_peft(model, mixlora_config(self.config.peft_kwargs()), f"adapter.{self.name}")

    #: the router balance term reads the routers' own statistics, never the model outputs (asking a TRL host
    #: for outputs costs a second forward pass)
    extra_loss_needs_outputs: ClassVar[bool] = False

    def extra_loss(self, model: Any, inputs: dict, outputs: Any):
        from .layers import router_loss

        loss = router_loss(model, inputs.get("attention_mask"))  # also releases the stored router logits
        return loss if self.config.router_aux_loss_coef > 0 else None

    def estimate(self, mem: Any) -> None:
        from .estimate import estimate_mixlora

        estimate_mixlora(mem, self.config)
