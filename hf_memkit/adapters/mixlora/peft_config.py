"""``hf_memkit.MixLoraConfig``: the PEFT config of the MIXLORA adapter type (imports peft; loaded lazily)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ...errors import RecipeError

#: attention projections per model type (the FFN is found by ``ffn_modules``)
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
}


def _bad(key: str, problem: str, fix: str) -> RecipeError:
    return RecipeError(problem, path="MixLoraConfig", key=key, fix=fix)


@dataclass
class MixLoraConfig(PeftConfig):
    """MixLoRA (TUDB-Labs, Li et al. 2024): LoRA on the attention projections, and in every FFN a top-k router
    over ``num_experts`` LoRA experts that share the frozen FFN weights. Saved as ``peft_type: MIXLORA``.

    ```python
    import hf_memkit
    from peft import get_peft_model
    model = get_peft_model(model, hf_memkit.MixLoraConfig(task_type="CAUSAL_LM", r=8, num_experts=8, top_k=2))
    loss = model(**batch).loss + hf_memkit.adapters.mixlora.layers.router_loss(model)
    ```
    """

    r: int = field(default=8, metadata={"help": "rank of every LoRA (attention and experts)"})
    lora_alpha: int = field(default=16, metadata={"help": "the updates are scaled by lora_alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on every adapter input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "attention projections that get plain LoRA (None: per model type)"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    ffn_modules: Union[list[str], str] = field(
        default="mlp", metadata={"help": "names (or suffixes, or a regex) of the FFN blocks that become MoE layers"})
    num_experts: int = field(default=8, metadata={"help": "LoRA experts per FFN"})
    top_k: int = field(default=2, metadata={"help": "experts per token"})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "load-balance loss coefficient"})
    router_init_range: float = field(default=0.02, metadata={"help": "std of the router's initial weights"})
    jitter_noise: float = field(default=0.0, metadata={"help": "train-time router input noise U(1-e, 1+e)"})
    init_lora_weights: bool = field(default=True, metadata={"help": "True: B = 0, so training starts at the base"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "unused"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "unused"})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "unsupported"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "modules trained in full"})
    bias: str = field(default="none", metadata={"help": "only 'none'"})

    def __post_init__(self):
        super().__post_init__()
        from ...integrations.peft_types import require

        require("MIXLORA")
        from peft.utils.peft_types import PeftType

        self.peft_type = PeftType.MIXLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.r < 1:
            raise _bad("r", f"r must be at least 1, got {self.r}", "use a rank such as 8")
        if self.num_experts < 1:
            raise _bad("num_experts", f"num_experts must be at least 1, got {self.num_experts}", "use e.g. 8")
        if not 1 <= self.top_k <= self.num_experts:
            raise _bad("top_k", f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}",
                       f"choose top_k <= {self.num_experts} (MixLoRA uses 2), or more experts")
        if not 0 <= self.lora_dropout < 1:
            raise _bad("lora_dropout", f"lora_dropout must be in [0, 1), got {self.lora_dropout}", "use e.g. 0.05")
        if self.router_aux_loss_coef < 0 or self.jitter_noise < 0 or self.router_init_range < 0:
            raise _bad("router_aux_loss_coef", "router_aux_loss_coef, jitter_noise and router_init_range must be "
                       ">= 0", "use the defaults 0.01, 0.0 and 0.02")
        if self.bias != "none":
            raise _bad("bias", f"bias={self.bias!r} is not supported by MixLoRA", "use bias='none'")
        if self.target_parameters:
            raise _bad("target_parameters", "MixLoRA adapts modules, not parameters", "remove target_parameters")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r
