from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ...technique import TechniqueConfig


class CCEConfig(TechniqueConfig):
    """``loss: {cce: {}}`` — Cut Cross-Entropy: the causal-LM loss without the N×V logit matrix.

    ```yaml
    loss: {cce: {impl: auto, filter_eps: auto}}
    ```
    Paper: Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024; apple/ml-cross-entropy).
    Plain PyTorch equivalent: ``F.cross_entropy((hidden @ lm_head.weight.T).float()[:, :-1].flatten(0, 1),
    labels[:, 1:].flatten(), ignore_index=-100)`` — what every ``*ForCausalLM`` computes when given labels,
    which keeps the logits, their fp32 copy, the log-probabilities and their gradient (about 12–16 bytes per token
    and vocabulary entry). This technique computes the same loss and gradients from the final hidden states and
    ``lm_head`` chunk by chunk, in O(tokens + vocabulary) extra memory plus one logit chunk (``memory_budget_mb``;
    on GPU the Triton kernels keep the logits in SRAM); for a scalar loss the gradients are formed during the
    forward pass, so no logit is computed twice. Logits are not computed in training; in evaluation the loss is
    always reported and the logits returned only when asked (``eval_logits``). Under TRL's SFTTrainer the fused loss
    also computes the token metrics it logs (``entropy``, ``mean_token_accuracy``, ``num_tokens``) in its chunked
    pass; TRL's DPO/GRPO/... trainers, whose losses are not next-token cross-entropy, refuse the loss slot.

    Not for: models whose vocabulary is small next to the hidden size (the logits are then cheap and the saving
    negligible); training that needs the logits themselves (distillation on full distributions, label smoothing,
    metrics computed from ``outputs.logits``); encoder-decoder models or families with an unknown logit
    transform (refused with an error); FSDP or DeepSpeed ZeRO-3, which shard lm_head's weight and gather it only
    inside ``lm_head.forward``.
    """

    impl: Literal["auto", "torch", "triton"] = Field(
        "auto", description="auto = Triton kernels on CUDA, the chunked PyTorch path elsewhere; resolved per call"
    )
    filter_eps: float | Literal["auto"] | None = Field(
        "auto",
        description="skip softmax-gradient entries below this magnitude; auto = 2^-12 (bf16), 2^-15 (fp16), "
        "none for fp32; null or 0 disables filtering",
    )
    z_loss: float = Field(0.0, ge=0, description="weight of the z-loss term z_loss·logsumexp(logits)² (0 = off)")
    memory_budget_mb: float | None = Field(
        None, gt=0, description="MiB one logit chunk of the PyTorch path may use (larger = fewer passes over "
        "lm_head, faster); null = half of the fp32 lm_head gradient, vocab·hidden·2 bytes (16 MiB..RAM/64)",
    )
    vocab_sort: bool = Field(
        True, description="Triton backward visits the vocabulary sorted by average logit, so filtered tiles cluster"
    )
    eval_logits: Literal["auto", "always", "never"] = Field(
        "auto",
        description="logits in evaluation: auto = only when the Trainer keeps them (prediction_loss_only is "
        "False, i.e. compute_metrics is set or predict() runs) or a direct eval-mode call; always; never",
    )
    verify_head: bool = Field(
        True, description="at patch time, check on 4 tokens that lm_head(final hidden states) reproduces the "
        "model's logits (catches an unknown logit transform)",
    )

    @field_validator("filter_eps")
    @classmethod
    def _non_negative(cls, v):
        if isinstance(v, float) and v < 0:
            raise ValueError("filter_eps must be 'auto', a number >= 0, or null")
        return v
