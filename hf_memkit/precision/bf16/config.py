from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...technique import TechniqueConfig


class Bf16Config(TechniqueConfig):
    """``precision: {bf16: {}}`` — every ``nn.Linear`` and ``nn.Embedding`` weight is stored in 16 bits (2 bytes
    per element instead of 4), while the model still computes in fp32; optimizer updates are written back with
    stochastic rounding (default) or Kahan compensation, so that updates smaller than half a bf16 ulp still count.

    ```yaml
    precision: {bf16: {update: stochastic}}      # or kahan (+2 bytes/param), or nearest (the failure mode)
    optimizer: {adamw_8bit: {}}
    ```
    Papers and code: Zamirai et al., "Revisiting BFloat16 Training" (2020: with round-to-nearest, bf16 weights
    cancel small updates; stochastic rounding or Kahan summation recover 32-bit accuracy); torchao's
    ``bf16_stochastic_round`` optimizers (the fp32 → bf16 bit trick), optimi's Kahan-compensated optimizers.

    What is stored how: Linear and Embedding weights — frozen or trained, PEFT LoRA base layers included — in
    ``dtype``; LoRA/adapter weights, norms, biases and buffers in fp32 (small, and sensitive). Activations, logits
    and every matmul are fp32: each Linear upcasts its weight for the matmul in a custom autograd Function that
    saves only the 16-bit weight and upcasts again in backward; weight gradients are formed in fp32 and stored in
    the weight's dtype. The run's optimizer is wrapped: for each 16-bit parameter it steps an fp32 copy of the
    weight and gradient (its state is what it keeps for an fp32 parameter: fp32 moments for torch AdamW, 8-bit
    for bitsandbytes), then writes the result back with ``update``. Weight decay is applied in fp32 before the
    rounding, so it survives in expectation. A weight larger than ``step_chunk_mib`` of fp32 (SmolLM2's tied
    embedding) is stepped a slice of rows at a time, so the step's fp32 scratch is one slice's, not the weight's.

    Plain PyTorch equivalent: ``model.to(torch.bfloat16)`` plus torchao's ``_AdamW(..., bf16_stochastic_round=True)``
    — which also computes activations in bf16 (slow on CPUs without bf16 instructions) and keeps bf16 optimizer
    states rounded to nearest (their second moment stagnates at β2 = 0.999).

    Load the checkpoint directly in 16 bits to never hold an fp32 copy: ``load_model_and_tokenizer(model,
    dtype=load_dtype(recipe))`` (:func:`hf_memkit.precision.bf16.loading.load_dtype`); the patch then only widens
    norms and biases. ``remove()`` puts every tensor back in the dtype it had: an fp32 model gets fp32 weights back,
    equal to the 16-bit values (so bit for bit the original only where its values were representable, e.g. a
    model loaded from a bf16 checkpoint; the patch logs how many tensors it rounded).

    Gradients of 16-bit weights are 16-bit too (each formed in fp32 and rounded once); with
    ``gradient_accumulation_steps`` > 1 they are summed across micro-batches in 16 bits (the run warns).

    Not for: DeepSpeed ZeRO / FSDP (they build and shard their own optimizer; use their bf16 modes); fp16
    ``TrainingArguments`` (GradScaler cannot unscale 16-bit gradients); techniques that replace Linear forwards
    themselves (Mesa, WTA-CRS, sparse updates, 2:4 training, SST; refused by name). Runs where the weights are a
    small part of memory (LoRA on a small model saves little beyond the frozen base).
    """

    dtype: Literal["bfloat16", "float16"] = Field(
        "bfloat16", description="storage dtype of Linear and Embedding weights (float16: range to 65504, finer "
        "mantissa; bfloat16: fp32's range)")
    update: Literal["stochastic", "kahan", "nearest"] = Field(
        "stochastic", description="how an fp32 update is written into a 16-bit weight: stochastic rounding "
        "(unbiased), kahan (round to nearest + a 16-bit compensation buffer per weight that carries the rounding "
        "error into the next update, +2 bytes/param), nearest (loses every update below half an ulp; for "
        "comparison)")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="seed of the stochastic-rounding generator (null = "
        "TrainingArguments.seed); data-parallel ranks share it, so replicas stay identical")
    skip_modules: list[str] = Field(
        default_factory=list, description="module names (or name suffixes, e.g. lm_head) whose weights stay fp32")
    step_chunk_mib: float = Field(
        4.0, ge=0, description="a 16-bit weight whose fp32 copy is larger than this (MiB) is stepped in slices of "
        "rows of at most about this size, so its fp32 copy, fp32 gradient and the optimizer's temporaries exist "
        "only one slice at a time (torch Adam/AdamW and bitsandbytes' 8-bit Adam/AdamW; other optimizers step "
        "whole weights); same result (bit for bit with kahan/nearest). 0 = never slice")

    def step_chunk_numel(self) -> int:
        """``step_chunk_mib`` in fp32 elements (the ``step_chunk`` of the optimizer wrapper)."""
        return int(self.step_chunk_mib * 2**20) // 4
