from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...config_types import MAX_RANK
from ...technique import TechniqueConfig


class LorcAdapterConfig(TechniqueConfig):
    """``adapter: {lorc: {}}`` — a quantized frozen base with a trainable LoRC compensation branch.

    ```yaml
    adapter: {lorc: {bits: 4, group_size: 128, rank: 8, quantizer: rtn, factor_bits: 8}}
    export: {format: compressed-tensors}   # quantized base + the branch as a standard PEFT LoRA adapter
    ```
    Paper: Yao et al., "ZeroQuant-V2" (2023) §5 (LoRC), trained like LoRA as in QLoRA. Plain PyTorch equivalent,
    per ``nn.Linear``: ``W_hat = Q(W); U, S, Vh = torch.linalg.svd(W - W_hat); A = U[:, :r] * S[:r].sqrt();
    B = S[:r].sqrt()[:, None] * Vh[:r]``, then train ``A, B`` in ``y = x @ W_hat.T + (x @ B.T) @ A.T`` with
    ``W_hat`` frozen. Unlike ``qlora`` the branch starts at the best rank-r correction of the quantization error
    (not at zero), the base keeps hf_memkit's int grid (exportable as compressed-tensors, where bitsandbytes nf4
    is not), and the factors may start INT8. The frozen base costs one byte per weight here (codes are kept
    unpacked for the dequantizing matmul) plus the scales. Saved as PEFT type ``LORC``.

    Not for: 8-bit targets (the error is tiny, plain ``lora`` is simpler); GPT-2 style Conv1D models (only
    ``nn.Linear`` is quantized); combining with a ``compress`` slot (this adapter quantizes the base itself).
    """

    rank: int = Field(8, ge=1, le=MAX_RANK,
                      description="rank r of the compensation A·B (capped at min(in, out) per layer)")
    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per frozen base weight")
    group_size: int | None = Field(128, ge=1, description="input columns per scale/zero point (null: per channel)")
    symmetric: bool = Field(False, description="symmetric grid instead of asymmetric")
    quantizer: Literal["rtn", "gptq"] = Field(
        "rtn", description="round-to-nearest, or GPTQ calibrated on the embedded corpus (needs the tokenizer)")
    factor_bits: Literal[4, 8] | None = Field(
        None, description="round the initial factors to a per-row symmetric grid of this many bits (null: keep)")
    lora_alpha: int | None = Field(None, ge=1, description="branch scaling numerator (null: = rank, scaling 1)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the branch input while training")
    target_modules: list[str] | str = Field(
        "all-linear", description="Linear layers to quantize and compensate ('all-linear': all but the head)")
    num_samples: int = Field(32, ge=1, description="gptq: calibration sequences from the embedded corpus")
    seq_len: int = Field(256, ge=8, description="gptq: tokens per calibration sequence")

    def peft_kwargs(self) -> dict:
        out = self.model_dump()
        out["r"] = out.pop("rank")
        return out
