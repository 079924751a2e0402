"""The ``compress:`` pruning techniques: they join the compress plan of :mod:`hf_memkit.compress.plan` (role
``pruner``), run after training in ``finalize`` (or in ``memkit compress``) before any quantizer of the same
list, and need no model patch."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from ..compress.capabilities import PRUNER
from ..compress.technique import CompressTechnique
from ..compress.fields import CalibrationFields
from ..technique import TechniqueConfig


class SemiStructuredFields(TechniqueConfig):
    n: int = Field(2, ge=1, description="N of N:M: weights kept per group (2:4 is the supported pattern)")
    m: int = Field(4, ge=2, description="M of N:M: consecutive input columns per group")
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"], description="Linear layers (name or "
                                    "name suffix) kept dense")


class PruneCalibrationFields(CalibrationFields):
    num_samples: int = Field(64, ge=1, description="calibration sequences")
    seq_len: int = Field(256, ge=8, description="tokens per calibration sequence")


class PruneTechnique(CompressTechnique):
    role: ClassVar[str] = PRUNER
    conflicts: ClassVar[dict[str, str]] = {
        "slot:adapter": "pruning runs on the plain base model; train and merge the adapter first "
                        "(export: {format: safetensors, merge_adapters: true}), then prune the merged folder",
    }

    @classmethod
    def run_pass(cls, model: Any, config: Any, *, calibration: Any = None, lorc: Any = None,
                 key: str | None = None) -> dict[str, Any]:
        from ..errors import IncompatibleModelError
        from .pipeline import prune_model_

        if lorc is not None:
            raise IncompatibleModelError(f"compress.{cls.name}: LoRC compensates a quantizer's rounding, not a "
                                         "pruning pass; give lorc to the quantizer's pass")
        return prune_model_(model, cls.name, config, calibration=calibration, key=key)

    def estimate(self, mem: Any) -> None:
        """Post-training passes leave training memory as it is."""

    def validate(self, ctx: Any) -> None:
        from .masks import check_nm

        if hasattr(self.config, "n"):
            check_nm(self.config.n, self.config.m, f"compress.{self.name}")
        super().validate(ctx)
