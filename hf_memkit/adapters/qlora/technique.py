from __future__ import annotations

from typing import Any, ClassVar

from ...technique import PatchHandle, Technique, ValidationContext
from ..lora.technique import attach_lora, estimate_lora
from .config import QLoraConfig
from ...integrations.versions import PEFT


_ENGINE_REASON = (
    "bitsandbytes 4-bit base weights (uint8 Params4bit) are not partitioned/gathered by ZeRO-3 or FSDP here"
)


class QLoraTechnique(Technique):
    name: ClassVar[str] = "qlora"
    slot: ClassVar[str] = "adapter"
    verified_with: ClassVar[dict[str, str]] = {"peft": PEFT}
    config_cls = QLoraConfig
    summary: ClassVar[str] = "bitsandbytes 4-bit (nf4) frozen base + PEFT LoRA"
    reference: ClassVar[str] = "Dettmers et al. 2023; bitsandbytes Linear4bit + peft"
    unsupported_engines: ClassVar[dict[str, str]] = {e: _ENGINE_REASON for e in ("zero3", "fsdp")}

    def validate(self, ctx: ValidationContext) -> None:
        from ...integrations.peft_utils import lora_config

        lora_config(self.config.peft_kwargs(), f"adapter.{self.name}", source=getattr(ctx.recipe, "source", None))

    def patch_model(self, model: Any) -> PatchHandle:
        from .quantize import quantize_linears_4bit_, restore_linears_

        cfg = self.config
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        originals, path = quantize_linears_4bit_(
            model, quant_type=cfg.quant_type, double_quant=cfg.double_quant, compute_dtype=cfg.compute_dtype,
            blocksize=cfg.blocksize, skip=cfg.skip_modules,
        )
        try:
            inner = attach_lora(model, cfg.peft_kwargs(), f"adapter.{self.name}")
        except Exception:
            restore_linears_(model, originals, path)
            raise

        def undo():
            base = inner.remove()
            restore_linears_(base, originals, path)
            for n, p in base.named_parameters():
                p.requires_grad_(flags[n])
            return base

        return PatchHandle(inner.model, undo)

    def describe(self, model: Any, optimizer: Any = None) -> str:
        from ...integrations.describe import adapter_line, quantized_4bit

        count, kind = quantized_4bit(model)
        c = self.config
        return (f"quantized {count} Linear layers to {kind} (bitsandbytes, blocksize {c.blocksize}"
                f"{', double quant' if c.double_quant else ''}); " + adapter_line(model, f"LoRA r={c.r}"))

    def estimate(self, mem: Any) -> None:
        cfg = self.config
        for p in mem.params_of_linears(skip=cfg.skip_modules):
            # 4 bits per value + one absmax per block (fp32, or 8-bit + a second-level fp32 per 256 blocks)
            blocks = -(-p.numel // cfg.blocksize)
            absmax = blocks * 1 + (-(-blocks // 256)) * 4 if cfg.double_quant else blocks * 4
            mem.set_storage(p.name, p.numel // 2 + absmax, note=f"{cfg.quant_type} 4-bit")
        estimate_lora(mem, cfg.peft_kwargs(), cfg.lora_dropout)
