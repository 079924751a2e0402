"""The base of the quantizer techniques (rtn, gptq, block_ap): their pass is :func:`.pipeline.quantize_model_`,
reached by name through :func:`hf_memkit.compress.passes.run_pass`."""

from __future__ import annotations

from typing import Any, ClassVar

from ..compress.capabilities import QUANTIZER
from ..compress.technique import CompressTechnique


class QuantizerTechnique(CompressTechnique):
    role: ClassVar[str] = QUANTIZER

    @classmethod
    def run_pass(cls, model: Any, config: Any, *, calibration: Any = None, lorc: Any = None,
                 key: str | None = None) -> Any:
        from .pipeline import quantize_model_

        return quantize_model_(model, cls.name, config, lorc=lorc, calibration=calibration, key=key)

    @classmethod
    def check_targets(cls, model: Any, config: Any, key: str) -> dict[str, Any]:
        from .pipeline import check_model

        return check_model(model, cls.name, config, key)
