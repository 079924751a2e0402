"""Where the decoder layers of a model are, and which parameters play which role outside them.

Model families differ only in the attribute path of their layer list, so a small table covers the common ones
and a structural fallback (the ``ModuleList`` with ``num_hidden_layers`` blocks of one class) covers the rest.
The same code runs on the real model (``patch_model``) and on the meta-device copy the estimator builds, so the
estimate and the run agree on names.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleModelError

#: layer-list paths, most common first (Llama/Mistral/Qwen2/Gemma/SmolLM, GPT-2, GPT-NeoX, OPT, Falcon/MPT)
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks",
               "layers")

#: role names accepted in ``always_train`` besides parameter-name patterns
ROLES = ("embeddings", "lm_head", "final_norm")


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _unwrap(model: Any) -> tuple[Any, str]:
    """A PeftModel keeps the transformers model at ``base_model.model``; names then carry that prefix."""
    inner = _get(model, "base_model.model")
    if inner is not None and hasattr(model, "peft_config"):
        return inner, "base_model.model."
    return model, ""


def num_hidden_layers(config: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    return None


@dataclass
class DecoderLayers:
    """``path`` is the dotted name of the layer list in ``model.named_modules()``; ``modules`` the blocks."""

    path: str
    modules: list[Any]
    #: parameter name -> layer index, for every parameter inside a layer
    layer_of: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.modules)

    def prefix(self, i: int) -> str:
        return f"{self.path}.{i}."


def find_decoder_layers(model: Any, attribute: str | None = None, key: str = "schedule") -> DecoderLayers:
    """The decoder layer list of ``model``; ``attribute`` (a dotted path) overrides the lookup."""
    import torch

    inner, outer_prefix = _unwrap(model)
    found, path = None, None
    if attribute:
        found = _get(inner, attribute)
        if not isinstance(found, torch.nn.ModuleList):
            raise IncompatibleModelError(
                f"{key}: layers_attribute {attribute!r} is not a ModuleList of {type(inner).__name__} "
                f"(got {type(found).__name__}); name the attribute that holds the decoder layers, e.g. "
                f"{', '.join(LAYER_PATHS[:2])}"
            )
        path = attribute
    else:
        for cand in LAYER_PATHS:
            obj = _get(inner, cand)
            if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
                found, path = obj, cand
                break
        if found is None:
            n = num_hidden_layers(getattr(inner, "config", None))
            for name, m in inner.named_modules():
                if isinstance(m, torch.nn.ModuleList) and len(m) == n and n and len({type(b) for b in m}) == 1:
                    found, path = m, name
                    break
    if found is None:
        raise IncompatibleModelError(
            f"{key}: cannot find the decoder layers of {type(inner).__name__} (looked for "
            f"{', '.join(LAYER_PATHS)}); set layers_attribute to the dotted path of its layer ModuleList"
        )
    full = outer_prefix + path
    layers = DecoderLayers(full, list(found))
    for i, block in enumerate(found):
        for n, _ in block.named_parameters():
            layers.layer_of[f"{full}.{i}.{n}"] = i
    return layers


def parameter_names(model: Any) -> dict[int, str]:
    """id(parameter) -> its (first) name; tied parameters resolve to one name."""
    out: dict[int, str] = {}
    for n, p in model.named_parameters():
        out.setdefault(id(p), n)
    return out


def is_norm(module: Any) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name and not any(True for _ in module.children())


def role_parameters(model: Any, layers: DecoderLayers, role: str) -> set[str]:
    """Parameter names of a role, found by module type so that every family resolves it the same way:
    ``embeddings`` = the Embedding modules outside the layers (token and position embeddings), ``lm_head`` =
    the output embeddings, ``final_norm`` = normalisation modules outside the layers."""
    import torch

    names = parameter_names(model)
    inside = layers.path + "."
    out: set[str] = set()
    if role == "lm_head":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            out |= {names[id(p)] for p in head.parameters() if id(p) in names}
        return out
    for mname, m in model.named_modules():
        if mname.startswith(inside) or mname == layers.path:
            continue
        if (role == "embeddings" and isinstance(m, torch.nn.Embedding)) or (role == "final_norm" and is_norm(m)):
            out |= {names[id(p)] for p in m.parameters(recurse=False) if id(p) in names}
    return out


def resolve_always_train(model: Any, layers: DecoderLayers, entries: list[str], key: str) -> set[str]:
    """Parameter names named by ``entries``: roles (see :data:`ROLES`) or ``fnmatch`` patterns of parameter
    names. A pattern that matches nothing is an error (a typo would silently freeze what the user meant to
    train)."""
    all_names = [n for n, _ in model.named_parameters()]
    out: set[str] = set()
    for entry in entries:
        if entry in ROLES:
            out |= role_parameters(model, layers, entry)
            continue
        hits = {n for n in all_names if fnmatch.fnmatchcase(n, entry)}
        if not hits:
            sample = ", ".join(all_names[:3] + all_names[-2:])
            raise IncompatibleModelError(
                f"{key}: always_train entry {entry!r} is neither a role ({', '.join(ROLES)}) nor a pattern that "
                f"matches a parameter of {type(model).__name__} (names look like {sample}); fix the pattern, "
                "e.g. 'model.layers.*.input_layernorm.weight'"
            )
        out |= hits
    return out
