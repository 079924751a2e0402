from __future__ import annotations

from pydantic import Field

from ...compress.fields import WeightQuantFields


class RTNConfig(WeightQuantFields):
    """``compress: [{rtn: {}}]`` — round-to-nearest weight quantization, the baseline every other pass beats.

    ```yaml
    compress: [{rtn: {bits: 4, group_size: 128, symmetric: false}}]
    export: {format: compressed-tensors}
    ```
    Reference: the RTN quantizer of IST-DASLab/gptq (``quant.py``), also ZeroQuant-V2's baseline (Yao et al.
    2023). Plain PyTorch equivalent, per group of ``group_size`` columns of each ``nn.Linear`` weight:
    ``s = (w.max() - w.min()) / (2**bits - 1); z = round(-w.min() / s); w_hat = s * (clamp(round(w / s) + z, 0,
    2**bits - 1) - z)``. Needs no calibration data and runs in seconds; runs after training (in ``finalize``).

    Not for: 2- or 3-bit targets (the error is large; use gptq, gptq + lorc or block_ap), nor when calibration
    text is available and quality matters at 4 bits (gptq is better at the same size).
    """

    mse: bool = Field(False, description="search each group's range (shrinking it up to 80%) for the smallest "
                      "|w - w_hat|^2.4 instead of using min/max")
