"""Which weights a matrix-aware optimizer manages, by role rather than by size.

Two rules live here because COSMOS, Fira and SST share them; both rest on the one model anatomy and target
matcher (:mod:`hf_memkit.integrations.anatomy`):

* :func:`hidden_matrix_names` — the 2-D weights of the Linear (or GPT-2 ``Conv1D``) layers inside the
  decoder layers. The input embedding, the output head (also when tied to the embedding), task heads and every
  ``nn.Embedding`` are excluded whatever their size: the COSMOS reference picks matrices by
  ``size(0) <= 10000``, which sends a small-vocabulary head into the matrix path and a large hidden layer out
  of it. A model without decoder layers (a plain MLP) counts every Linear but the output head.
* :func:`resolve_target_linears` — ``target_modules`` as PEFT reads it (a list of module names matched whole or
  as ``.``-suffixes, a regex over the whole name, or ``"all-linear"`` = every Linear but the output head), the
  trainable Linears only.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...errors import IncompatibleModelError
from ...integrations.anatomy import (anatomy, base_linears, embedding_parameter_ids, is_all_linear,  # noqa: F401
                                     linear_types, output_head_names, target_linears)


def hidden_matrix_names(model: Any) -> set[str]:
    """Names (as ``named_parameters`` spells them) of the decoder layers' 2-D Linear/Conv1D weights."""
    excluded = embedding_parameter_ids(model)
    try:
        body = anatomy(model, key="optimizer")
        modules = [(name, m) for i in range(len(body.layers)) for name, m in body.block_linears(i)]
    except IncompatibleModelError:  # no decoder layers: every Linear but the head
        heads = output_head_names(model)
        modules = [(n, m) for n, m in base_linears(model) if n not in heads]
    kinds = linear_types()
    out = set()
    for name, module in modules:
        for sub, m in module.named_modules():
            if not isinstance(m, kinds):
                continue
            w = getattr(m, "weight", None)
            full = ".".join(x for x in (name, sub, "weight") if x)
            if w is not None and w.dim() == 2 and id(w) not in excluded:
                out.add(full)
    return out


def resolve_target_linears(model: Any, target: "str | list[str]", *, key: str, trainable_only: bool = True,
                           exact_type: bool = False) -> list[tuple[str, Any]]:
    """``(module name, nn.Linear)`` pairs selected by ``target``; raises IncompatibleModelError when none.
    ``exact_type`` skips ``nn.Linear`` subclasses (quantized layers, adapters' wrappers) and Conv1D."""
    from torch import nn

    found = target_linears(model, target, key=key, trainable_only=trainable_only, exact_type=exact_type)
    linears = [(n, m) for n, m in found if isinstance(m, nn.Linear)]
    if not linears:
        raise IncompatibleModelError(
            f"{key}: target_modules={target!r} selects only GPT-2 Conv1D layers, which this optimizer does not "
            "project; use a model with nn.Linear layers"
        )
    return linears


def split_by_identity(params: Iterable[Any], chosen: set[int]) -> tuple[list[Any], list[Any]]:
    inside, outside = [], []
    for p in params:
        (inside if id(p) in chosen else outside).append(p)
    return inside, outside
