from __future__ import annotations

from pydantic import Field, model_validator

from ...config_types import MAX_RANK
from ...technique import TechniqueConfig


class MixLoraFields(TechniqueConfig):
    """``adapter: {mixlora: {}}`` — MixLoRA: LoRA on attention, and a top-k mixture of LoRA experts in every FFN.

    ```yaml
    adapter: {mixlora: {num_experts: 8, top_k: 2, r: 8, lora_alpha: 16, router_aux_loss_coef: 0.01}}
    ```
    Paper: Li et al., "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts"
    (2024; TUDB-Labs/MixLoRA, MoE-PEFT). Plain PyTorch equivalent, per FFN with input ``h``:
    ``p = softmax(h @ G.T); w, i = p.topk(k); w /= w.sum(-1, keepdim=True)`` then
    ``y = Σ_j w_j · FFN_{i_j}(h)`` where expert ``e`` is the frozen FFN with ``W += (α/r)·B_e A_e`` on each
    projection; here every frozen projection runs once per token and the experts add only their LoRA deltas on
    their own tokens (exact, because the weights sum to one). The router's load-balance loss
    ``coef · E · Σ_{j,i} f_ji · P_i`` (Mixtral/Switch, f over the top-k choices: uniform routing gives
    ``coef · k``) is added to the training loss. Saved as a PEFT adapter of type ``MIXLORA``
    (``PeftModel.from_pretrained`` after ``import hf_memkit``). SwiGLU (Llama, Qwen2, Mistral) and two-layer
    (GPT-2) FFNs.

    Not for: merging into the base weights (the experts are chosen per token, there is no merged form); runtimes
    that only serve plain LoRA (vLLM, llama.cpp); small single-task fine-tunes, where plain ``lora`` is as good
    and cheaper per step.
    """

    r: int = Field(8, ge=1, le=MAX_RANK, description="rank of every LoRA (attention projections and experts)")
    lora_alpha: int = Field(16, ge=1, description="scaling numerator: updates are scaled by lora_alpha / r")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on every adapter input")
    target_modules: list[str] | str | None = Field(
        None, description="attention projections that get plain LoRA (null: q/k/v/o_proj, or c_attn/c_proj for GPT-2)"
    )
    ffn_modules: list[str] | str = Field("mlp", description="name (suffix) of the FFN blocks that become MoE layers")
    num_experts: int = Field(8, ge=1, le=1024, description="LoRA experts per FFN")
    top_k: int = Field(2, ge=1, description="experts per token (at most num_experts)")
    router_aux_loss_coef: float = Field(0.01, ge=0, description="coefficient of the router load-balance loss")
    router_init_range: float = Field(0.02, ge=0, description="std of the router's initial weights")
    jitter_noise: float = Field(0.0, ge=0, lt=1, description="multiply router inputs by U(1-e, 1+e) in training")

    @model_validator(mode="after")
    def _k_at_most_e(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts}); lower top_k or "
                             "add experts")
        return self

    def peft_kwargs(self) -> dict:
        return self.model_dump()
