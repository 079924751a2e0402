"""What a sparse update trains: a :class:`Plan` (bias layers + selected channels per Linear), and how its parts are
found in a model. The same functions run on the real model and on the estimator's meta-device copy."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from ...errors import IncompatibleModelError
from ...integrations.anatomy import DecoderLayers, is_norm, parameter_names, role_parameters


@dataclass
class Plan:
    """``bias_layers``: the last k layers whose biases/norms train. ``channels``: Linear module name -> the
    selected input channels (sorted). ``full``: modules whose whole weight trains as is (ratio 1, float)."""

    bias_layers: int
    channels: dict[str, list[int]] = field(default_factory=dict)
    full: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"bias_layers": self.bias_layers, "channels": self.channels, "full": self.full}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        return cls(int(data["bias_layers"]), {k: [int(i) for i in v] for k, v in data["channels"].items()},
                   list(data.get("full", [])))


def resolve_layer_indices(indices: list[int], n: int, key: str) -> list[int]:
    out = []
    for i in indices:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IncompatibleModelError(
                f"{key}: weight_layers entry {i} is outside the model's {n} decoder layers; use 0..{n - 1} or "
                f"-1..-{n}"
            )
        out.append(j)
    return out


def linear_modules(model: Any, layers: DecoderLayers, layer_indices: list[int], patterns: list[str],
                   key: str) -> list[tuple[int, str, Any]]:
    """(layer index, full module name, module) for every ``nn.Linear`` of the given layers whose name inside the
    layer matches one of ``patterns``."""
    import torch

    out = []
    for i in layer_indices:
        pre = layers.prefix(i)
        for rel, m in layers.modules[i].named_modules():
            if rel and isinstance(m, torch.nn.Linear) and any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                out.append((i, pre + rel, m))
    if layer_indices and not out:
        rels = sorted({rel for rel, m in layers.modules[layer_indices[0]].named_modules()
                       if isinstance(m, torch.nn.Linear)})
        raise IncompatibleModelError(
            f"{key}: weight_modules {patterns} match no nn.Linear inside decoder layer {layer_indices[0]} "
            f"(its Linear modules: {', '.join(rels) or 'none'}); use those names or '*'"
        )
    return out


def layer_bias_norm_parameters(model: Any, layers: DecoderLayers, i: int) -> list[str]:
    """Names of the biases and normalisation weights of decoder layer ``i``."""
    names = parameter_names(model)
    out: list[str] = []
    for rel, m in layers.modules[i].named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if (pn == "bias" or is_norm(m)) and id(p) in names and names[id(p)] not in out:
                out.append(names[id(p)])
    return out


def bias_norm_parameters(model: Any, layers: DecoderLayers, k: int) -> list[str]:
    """Biases and norm weights of the last ``k`` layers, plus the final norm when ``k`` >= 1."""
    n = len(layers)
    out = [name for i in range(max(n - k, 0), n) for name in layer_bias_norm_parameters(model, layers, i)]
    if k >= 1:
        out += sorted(role_parameters(model, layers, "final_norm"))
    return out
