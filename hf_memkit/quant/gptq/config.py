from __future__ import annotations

from pydantic import Field, model_validator

from ...compress.fields import CalibrationFields, WeightQuantFields


class GPTQConfig(CalibrationFields, WeightQuantFields):
    """``compress: [{gptq: {}}]`` — GPTQ: second-order weight quantization from calibration activations.

    ```yaml
    compress: [{gptq: {bits: 4, group_size: 128, num_samples: 128, seq_len: 512}}, {lorc: {rank: 8}}]
    export: {format: compressed-tensors}
    ```
    Paper: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
    (ICLR 2023); reference code IST-DASLab/gptq. Plain PyTorch equivalent, per ``nn.Linear`` with calibration
    inputs ``X [N, in]``: ``H = 2 X.T @ X / N + damp·mean(diag H)·I; U = cholesky(inverse(H)).T`` then for each
    column ``j``: ``q = Q(W[:, j]); W[:, j+1:] -= outer((W[:, j] - q) / U[j, j], U[j, j+1:])``. Decoder blocks
    are processed one at a time (block ``l`` sees the outputs of the already-quantized blocks), so the extra
    memory is the calibration hidden states plus one block's Hessians. Runs after training (``finalize``), or
    before it when an ``e2e_qp`` follows in the recipe.

    Not for: models without a list of decoder blocks (use rtn); very few calibration tokens (fewer than a few
    times the widest layer's input width gives a poorly conditioned Hessian); 2-bit targets on small models
    (use block_ap + e2e_qp).
    """

    block_size: int = Field(128, ge=1, description="columns per lazy-update block (rounded to whole groups)")
    damp: float = Field(0.01, gt=0, lt=1, description="dampening added to diag(H), as a fraction of its mean")
    act_order: bool = Field(False, description="quantize columns in order of decreasing activation energy diag(H)")
    static_groups: bool = Field(
        False, description="fit every group's grid before the pass (required with act_order and groups)"
    )
    mse: bool = Field(False, description="search each group's range for the smallest |w - w_hat|^2.4 (see rtn)")

    @model_validator(mode="after")
    def _act_order_needs_static_groups(self):
        if self.act_order and self.group_size is not None and not self.static_groups:
            raise ValueError(
                "act_order with group_size needs static_groups: true (the exported format stores groups in "
                "column order and has no g_idx); set static_groups: true, or group_size: null"
            )
        return self
