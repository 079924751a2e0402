from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..lora.config import LoraConfigFields


class QLoraConfig(LoraConfigFields):
    """``adapter: {qlora: {}}`` — LoRA on a base whose Linear layers are stored as bitsandbytes 4-bit.

    ```yaml
    adapter: {qlora: {r: 16, quant_type: nf4, double_quant: true}}
    ```
    Paper: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023). Plain equivalent:
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))``
    then ``get_peft_model``. Here the already-loaded model is quantized in place (every Linear except the output
    head), so it also works on a model you built yourself. Frozen base weights take about 0.5 byte/param plus
    one absmax per 64 values. Not when you will merge the adapter into a full-precision export (train with
    plain ``lora``), nor for models whose quality collapses at 4 bits.
    """

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights")
    double_quant: bool = Field(True, description="quantize the absmax statistics too (saves ~0.4 bit/param)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the 4-bit weights are dequantized to for the matmul"
    )
    blocksize: Literal[64, 128, 256] = Field(64, description="values per absmax block")
    skip_modules: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="Linear modules (by name suffix) kept in full precision"
    )

    def peft_kwargs(self) -> dict:
        out = self.model_dump()
        for k in ("quant_type", "double_quant", "compute_dtype", "blocksize", "skip_modules"):
            out.pop(k)
        return out
