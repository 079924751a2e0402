from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ...technique import TechniqueConfig

COVER = ("linear", "norm", "mlp", "attention")


class MesaConfig(TechniqueConfig):
    """``activations: [{mesa: {}}]`` — the tensors autograd saves for backward are kept in 8 bits; the forward
    runs in full precision, so outputs and the loss are unchanged and only the gradients carry quantization noise.

    ```yaml
    activations: [{mesa: {bits: 8, groups: 8, ema_decay: 0.9}}]
    ```
    Paper: Pan et al., "Mesa: A Memory-saving Training Framework for Transformers" (2021; ziplab/Mesa). Each
    saved tensor is split into groups (``groups`` contiguous channel groups; one group per head for attention
    tensors) whose range and shift follow a running estimate; values are stochastically rounded (unbiased inside
    the range) and clamped at both ends. Departure from the paper: by default (``range: cover``) the range used
    for a tensor is widened to that tensor's own min/max — pure running ranges (``range: ema``) lag behind a
    growing residual stream and clip it, which flipped the RMSNorm input gradients of the tiny Llama. Covered: Linear inputs, RMSNorm/LayerNorm inputs, the gate and up outputs
    of gated MLPs (SwiGLU/GeGLU) or the input of other SiLU/GELU modules, and — with eager attention — q, k, v and
    the softmax output. SDPA/flash attention keep their own (exact, 16/32-bit) saved tensors: load the model with
    ``attn_implementation="eager"`` to compress those too. Plain PyTorch equivalent: a
    ``torch.autograd.graph.saved_tensors_hooks`` pair that packs every saved tensor to uint8 with a min/max
    computed per call (no running estimate, no stochastic rounding — ActNN-style compression that the paper
    reports diverging on ViTs); or simply ``torch.utils.checkpoint`` (exact, but recomputes the forward).

    Not for: already memory-light runs (LoRA on a frozen base saves little that Mesa can shrink); models whose
    saved activations are dominated by SDPA/flash attention tensors (long sequences) unless switched to eager
    attention — which itself costs O(L²) memory per head; runs that need bit-exact gradients. With gradient
    checkpointing only the layer being recomputed is compressed.
    """

    bits: int = Field(8, description="bits per saved element; only 8 is implemented (Mesa's setting)")
    groups: int = Field(8, ge=1, le=4096, description="channel groups per tensor, each with its own range "
                        "(gcd with the channel count); attention tensors always get one group per head")
    ema_decay: float = Field(0.9, ge=0, lt=1, description="λ of the running range estimate (0 = the current "
                             "tensor's min/max only)")
    range: Literal["cover", "ema"] = Field(
        "cover", description="cover = the running range widened to each tensor's own min/max (nothing clipped); "
        "ema = Mesa's running range as is, values outside it clamped (can bias gradients while ranges grow)")
    cover: list[Literal["linear", "norm", "mlp", "attention"]] = Field(
        list(COVER), description="which ops save 8-bit tensors: linear inputs, norm inputs, MLP activations, "
        "eager attention (q, k, v, softmax)")
    impl: Literal["auto", "torch", "triton"] = Field(
        "auto", description="quantizer: auto = Triton kernels on CUDA, plain PyTorch elsewhere")

    @field_validator("bits")
    @classmethod
    def _eight_bits(cls, v: int) -> int:
        if v != 8:
            raise ValueError(f"bits={v} is not supported: Mesa stores 8-bit activations; set bits: 8 (for fewer "
                             "bits use gradient checkpointing or offload instead)")
        return v
