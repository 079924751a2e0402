from __future__ import annotations

from pydantic import Field

from ...technique import TechniqueConfig
from ...compress.fields import CalibrationFields, WeightQuantFields


class BlockAPConfig(CalibrationFields, WeightQuantFields):
    """``compress: [{block_ap: {}}]`` — EfficientQAT Block-AP: block-wise training of weights, norms and the
    quantization parameters against the full-precision block.

    ```yaml
    compress: [{block_ap: {bits: 2, group_size: 64, epochs: 2}}, {e2e_qp: {}}]
    training_args: {learning_rate: 2.0e-5, max_grad_norm: 0.3, warmup_steps: 0.03, lr_scheduler_type: cosine}
    export: {format: compressed-tensors}
    ```
    Paper: Chen et al., "EfficientQAT: Efficient Quantization-Aware Training for Large Language Models" (2024);
    reference code OpenGVLab/EfficientQAT (``quantize/block_ap.py``). Plain PyTorch equivalent, per decoder
    block ``f`` with full-precision outputs ``y = f(x_fp)``: replace each Linear weight by
    ``s * (clamp(round_ste(W / s) + round_ste(z), 0, 2**bits - 1) - round_ste(z))`` with learnable ``s, z``,
    and minimise ``mse(f_q(x_q), y)`` with AdamW over ``(s, z)`` (lr 1e-4) and the weights and norms (lr 1e-5,
    2e-5 at 2 bits), cosine-decayed to 1/20; then fix the codes and feed ``f_q(x_q)`` to the next block. One block
    trains at a time, so the memory is one block's weights, gradients and AdamW state plus the calibration
    hidden states. Runs after training, or before it when ``e2e_qp`` follows (then on the embedded corpus:
    the run's data is not available yet). LoRC may follow it.

    Not for: large calibration budgets on a CPU (every block trains for ``epochs`` passes over the samples: the
    paper uses 4096 x 2048 tokens on a GPU); 8-bit weights (RTN is already near lossless).
    """

    epochs: int = Field(2, ge=1, description="passes over the calibration samples per block")
    batch_size: int = Field(
        8, ge=1, description="sequences per optimisation step (8 x 512 tokens = the reference's 2 x 2048 per step)"
    )
    lr_quant: float = Field(1e-4, gt=0, description="AdamW learning rate of the scales and zero points")
    lr_weight: float | None = Field(
        None, ge=0, description="AdamW learning rate of the weights and norm weights; null = 2e-5 at 2 bits, "
        "1e-5 otherwise (the reference's values); 0 freezes them",
    )
    train_norms: bool = Field(True, description="also train the block's normalisation weights")
    seed: int = Field(0, ge=0, description="seed of the sample order")

    def weight_lr(self) -> float:
        if self.lr_weight is not None:
            return self.lr_weight
        return 2e-5 if self.bits == 2 else 1e-5


class E2EQPConfig(TechniqueConfig):
    """``compress: [{block_ap: {}}, {e2e_qp: {}}]`` — EfficientQAT E2E-QP: end-to-end training of only the
    step sizes (scales) of the frozen quantized model, by the recipe's own Trainer run.

    ```yaml
    compress: [{block_ap: {bits: 2, group_size: 64}}, {e2e_qp: {}}]
    training_args: {learning_rate: 2.0e-5, max_grad_norm: 0.3, warmup_steps: 0.03, lr_scheduler_type: cosine}
    ```
    Paper: Chen et al. 2024 (EfficientQAT), ``main_e2e_qp.py``. Plain PyTorch equivalent: replace each quantized
    Linear by ``y = x @ ((q - z) * s).T`` with integer ``q, z`` buffers and ``s`` the only ``nn.Parameter`` of the
    model, then train normally. The grid comes from the quantizer listed before it (block_ap, gptq or rtn, run
    before training); alone, it starts from RTN with rtn's defaults. Trains about 1/group_size of the weight
    count; the backward recomputes each dequantized weight instead of keeping it, so activations cost what a
    frozen model's do (each quantized layer keeps its input).

    Learning rate: the recipe's ``training_args.learning_rate`` applies to the scales directly; use the paper's
    1e-5 (3/4 bits) or 2e-5 (2 bits). Not for: changing what the model knows (only the scales move; fine-tune
    first, then quantize), nor together with lorc or an adapter.
    """
