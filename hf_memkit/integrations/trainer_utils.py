"""Small reads of Trainer conventions that optimizer techniques reuse."""

from __future__ import annotations

from typing import Any

# the Trainer's own rule (Trainer.get_decay_parameter_names): no decay on biases and normalisation weights
_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups, as the stock Trainer builds them."""
    from torch import nn
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
