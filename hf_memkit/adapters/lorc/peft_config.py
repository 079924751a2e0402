"""``hf_memkit.LorcConfig``: the PEFT config of the LORC adapter type (imports peft; loaded lazily), generated
from the recipe's :class:`~.config.LorcAdapterConfig` (``rank`` is PEFT's ``r``)."""

from __future__ import annotations

from typing import Any

from ...integrations.peft_fields import peft_config_class
from .config import LorcAdapterConfig


def _alpha_defaults_to_r(config: Any) -> None:
    if config.lora_alpha is None:
        config.lora_alpha = config.r


_DOC = """LoRC as a trainable adapter (ZeroQuant-V2 §5): each target ``nn.Linear`` is quantized (``bits``,
``group_size``; RTN, or GPTQ on the embedded corpus) and frozen, and a rank-``r`` branch initialised from the
truncated SVD of the quantization error is trained like LoRA. Saved as ``peft_type: LORC``; the adapter
holds the integer codes too, so ``PeftModel.from_pretrained(full_precision_base, dir)`` rebuilds exactly the
trained model. ``lora_alpha`` defaults to ``r`` (scaling 1, the form the LoRA export uses).

```python
model = get_peft_model(model, hf_memkit.LorcConfig(task_type="CAUSAL_LM", r=8, bits=4, group_size=128))
```
"""

LorcConfig = peft_config_class(
    "LorcConfig", LorcAdapterConfig, "LORC", module=__name__, renames={"rank": "r"}, check=_alpha_defaults_to_r,
    doc=_DOC,
    namespace={"scaling": property(lambda self: self.lora_alpha / self.r)},
)
