"""``hf_memkit.MixLoraConfig``: the PEFT config of the MIXLORA adapter type (imports peft; loaded lazily),
generated from the recipe's :class:`~.config.MixLoraFields` (one config: fields, defaults, help and validation
written once)."""

from __future__ import annotations

from ...integrations.peft_fields import peft_config_class
from .config import MixLoraFields

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


_DOC = """MixLoRA (TUDB-Labs, Li et al. 2024): LoRA on the attention projections, and in every FFN a top-k router
over ``num_experts`` LoRA experts that share the frozen FFN weights. Saved as ``peft_type: MIXLORA``.

```python
import hf_memkit
from peft import get_peft_model
model = get_peft_model(model, hf_memkit.MixLoraConfig(task_type="CAUSAL_LM", r=8, num_experts=8, top_k=2))
loss = model(**batch).loss + hf_memkit.adapters.mixlora.layers.router_loss(model)
```
"""

MixLoraConfig = peft_config_class(
    "MixLoraConfig", MixLoraFields, "MIXLORA", module=__name__,
    doc=_DOC,
    namespace={"scaling": property(lambda self: self.lora_alpha / self.r)},
)
