from __future__ import annotations

import os
import tempfile
import weakref
from typing import Any, ClassVar

from ...technique import PatchHandle, Technique, ValidationContext
from .config import LorcAdapterConfig
from ...integrations.versions import PEFT


def lorc_config(fields: dict) -> Any:
    from .peft_config import LorcConfig

    return LorcConfig(task_type="CAUSAL_LM", **fields)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_ENGINE_REASON = (
    "the quantized frozen base lives in integer tensors that ZeRO-3/FSDP do not shard and gather"
)


class LorcAdapterTechnique(Technique):
    name: ClassVar[str] = "lorc"
    slot: ClassVar[str] = "adapter"
    verified_with: ClassVar[dict[str, str]] = {"peft": PEFT}
    config_cls = LorcAdapterConfig
    summary: ClassVar[str] = "quantized frozen base + trainable LoRC (SVD-initialised) branch, exports as LoRA"
    reference: ClassVar[str] = "Yao et al. 2023, ZeroQuant-V2 §5; PEFT type LORC"
    unsupported_engines: ClassVar[dict[str, str]] = {e: _ENGINE_REASON for e in ("zero3", "fsdp")}
    conflicts: ClassVar[dict[str, str]] = {
        "slot:compress": "the lorc adapter quantizes the base itself; a compress pass would quantize it twice",
    }

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._export = None

    def validate(self, ctx: ValidationContext) -> None:
        lorc_config(self.config.peft_kwargs())
        self._export = getattr(ctx.recipe, "export", None)

    def patch_model(self, model: Any) -> PatchHandle:
        """Snapshot the full-precision Linear weights to a temporary file (the layers drop them), wrap the model,
        and restore them bit for bit in ``remove()``."""
        import torch
        from safetensors.torch import load_file, save_file

        from ...integrations.peft_utils import wrap_with_peft

        linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        fd, path = tempfile.mkstemp(prefix="memkit-lorc-", suffix=".safetensors")
        os.close(fd)
        save_file({n: m.weight.detach().clone().contiguous() for n, m in linears.items()}, path)
        weakref.finalize(model, _unlink, path)
        try:
            inner = wrap_with_peft(model, lorc_config(self.config.peft_kwargs()), f"adapter.{self.name}")
        except Exception:
            saved = load_file(path)
            with torch.no_grad():
                for n, m in linears.items():
                    from ...compress.linear import clear_quantized_

                    clear_quantized_(m)
                    m.weight.data = saved[n].to(m.weight.device)
            _unlink(path)
            raise

        def undo():
            base = inner.remove()
            saved = load_file(path)
            for n, m in linears.items():
                m.weight.data = saved[n].to(m.weight.device)
            _unlink(path)
            return base

        return PatchHandle(inner.model, undo)

    def estimate(self, mem: Any) -> None:
        from .estimate import estimate_lorc

        estimate_lorc(mem, self.config)

    def finalize(self, model: Any, output_dir: str) -> None:
        export = self._export
        if export is not None and export.format == "compressed-tensors":
            from .export import export_lorc

            export_lorc(model, os.path.join(output_dir, export.dir))
