"""``hf_memkit.LorcConfig``: the PEFT config of the LORC adapter type (imports peft; loaded lazily)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ...errors import RecipeError


def _bad(key: str, problem: str, fix: str) -> RecipeError:
    return RecipeError(problem, path="LorcConfig", key=key, fix=fix)


@dataclass
class LorcConfig(PeftConfig):
    """LoRC as a trainable adapter (ZeroQuant-V2 §5): each target ``nn.Linear`` is quantized (``bits``,
    ``group_size``; RTN, or GPTQ on the embedded corpus) and frozen, and a rank-``r`` branch initialised from the
    truncated SVD of the quantization error is trained like LoRA. Saved as ``peft_type: LORC``; the adapter
    holds the integer codes too, so ``PeftModel.from_pretrained(full_precision_base, dir)`` rebuilds exactly the
    trained model. ``lora_alpha`` defaults to ``r`` (scaling 1, the form the LoRA export uses).

    ```python
    model = get_peft_model(model, hf_memkit.LorcConfig(task_type="CAUSAL_LM", r=8, bits=4, group_size=128))
    ```
    """

    r: int = field(default=8, metadata={"help": "rank of the compensation A·B"})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "scaling numerator (None: r, scaling 1)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the branch input while training"})
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "Linear layers to quantize and compensate"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    bits: int = field(default=4, metadata={"help": "bits per base weight: 2, 3, 4 or 8"})
    group_size: Optional[int] = field(default=128, metadata={"help": "columns per scale (None: per channel)"})
    symmetric: bool = field(default=False, metadata={"help": "symmetric grid"})
    quantizer: str = field(default="rtn", metadata={"help": "rtn, or gptq (calibrated on the embedded corpus)"})
    factor_bits: Optional[int] = field(default=None, metadata={"help": "round the initial factors to 4 or 8 bits"})
    num_samples: int = field(default=32, metadata={"help": "gptq calibration sequences"})
    seq_len: int = field(default=256, metadata={"help": "gptq calibration tokens per sequence"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "unused"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "unused"})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "unsupported"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "modules trained in full"})
    bias: str = field(default="none", metadata={"help": "only 'none'"})

    def __post_init__(self):
        super().__post_init__()
        from ...integrations.peft_types import require

        require("LORC")
        from peft.utils.peft_types import PeftType

        from ...quant.grid import SUPPORTED_BITS

        self.peft_type = PeftType.LORC
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.r < 1:
            raise _bad("r", f"r must be at least 1, got {self.r}", "use a rank such as 8")
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        if self.bits not in SUPPORTED_BITS:
            raise _bad("bits", f"{self.bits}-bit weights are not supported", f"use one of {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size < 1:
            raise _bad("group_size", f"group_size must be >= 1 or None, got {self.group_size}", "use e.g. 128")
        if self.quantizer not in ("rtn", "gptq"):
            raise _bad("quantizer", f"unknown quantizer {self.quantizer!r}", "use 'rtn' or 'gptq'")
        if self.factor_bits not in (None, 4, 8):
            raise _bad("factor_bits", f"factor_bits must be None, 4 or 8, got {self.factor_bits}", "use 8 or None")
        if self.bias != "none":
            raise _bad("bias", f"bias={self.bias!r} is not supported by LoRC", "use bias='none'")
        if self.target_parameters:
            raise _bad("target_parameters", "LoRC adapts modules, not parameters", "remove target_parameters")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r
