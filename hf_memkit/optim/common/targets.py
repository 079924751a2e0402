"""Which weights a matrix-aware optimizer manages, by role rather than by size.

Two rules live here because COSMOS, Fira and SST share them:

* :func:`hidden_matrix_names` — the 2-D weights of the Linear (or GPT-2 ``Conv1D``) layers inside the
  repeated decoder blocks. The input embedding, the output head (also when tied to the embedding), task heads
  and every ``nn.Embedding`` are excluded whatever their size: the COSMOS reference picks matrices by
  ``size(0) <= 10000``, which sends a small-vocabulary head into the matrix path and a large hidden layer out
  of it.
* :func:`resolve_target_linears` — ``target_modules`` with the conventions of
  ``TrainingArguments.optim_target_modules``: a string is a regex matched against the full module name, a list
  matches a module whose name equals an entry, contains an entry, or fully matches it as a regex. One
  difference, on purpose: ``"all-linear"`` means every ``nn.Linear`` *except the output head* (as in PEFT);
  transformers' GaLore wiring also projects ``lm_head``, which the Fira and SST papers never do.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from ...errors import IncompatibleModelError

ALL_LINEAR = "all-linear"


def _linear_types() -> tuple[type, ...]:
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def embedding_parameter_ids(model: Any) -> set[int]:
    """ids of the input embedding, the output head and every ``nn.Embedding`` weight (tied ones included)."""
    from torch import nn

    ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if module is not None and getattr(module, "weight", None) is not None:
            ids.add(id(module.weight))
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            ids.add(id(m.weight))
    return ids


def output_head_names(model: Any) -> set[str]:
    fn = getattr(model, "get_output_embeddings", None)
    head = fn() if callable(fn) else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names or {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}


def hidden_matrix_names(model: Any) -> set[str]:
    """Names (as ``named_parameters`` spells them) of the hidden layers' 2-D weights: Linear/Conv1D weights
    inside the repeated blocks (any ``nn.ModuleList``, e.g. ``model.layers`` or ``transformer.h``), so that
    task heads (``lm_head``, a classifier's ``score``) and embeddings stay out. A model without a ModuleList
    (a plain MLP) counts every Linear but the output head."""
    from torch import nn

    excluded = embedding_parameter_ids(model)
    heads = output_head_names(model)
    kinds = _linear_types()
    stacks = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    out = set()
    for name, module in model.named_modules():
        if name in heads or not isinstance(module, kinds):
            continue
        if stacks and not any(name.startswith(s + ".") if s else True for s in stacks):
            continue
        w = getattr(module, "weight", None)
        if w is not None and w.dim() == 2 and id(w) not in excluded:
            out.add(f"{name}.weight" if name else "weight")
    return out


def _matches(target: "str | list[str]", name: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return name in target or any(t in name for t in target) or any(re.fullmatch(t, name) for t in target)


def is_all_linear(target: "str | list[str]") -> bool:
    return isinstance(target, str) and target.replace("_", "-") == ALL_LINEAR


def resolve_target_linears(model: Any, target: "str | list[str]", *, key: str, trainable_only: bool = True,
                           exact_type: bool = False) -> list[tuple[str, Any]]:
    """``(module name, nn.Linear)`` pairs selected by ``target``; raises IncompatibleModelError when none.
    ``exact_type`` skips ``nn.Linear`` subclasses (quantized layers, adapters' wrappers)."""
    from torch import nn

    heads = output_head_names(model)
    excluded = embedding_parameter_ids(model)
    everything = is_all_linear(target)
    found, linear_names = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (exact_type and type(module) is not nn.Linear):
            continue
        linear_names.append(name)
        if everything and (name in heads or id(module.weight) in excluded):
            continue
        if not everything and not _matches(target, name):
            continue
        if trainable_only and not module.weight.requires_grad:
            continue
        found.append((name, module))
    if not found:
        shown = ", ".join(linear_names[:6]) + (", ..." if len(linear_names) > 6 else "")
        raise IncompatibleModelError(
            f"{key}: target_modules={target!r} selects no trainable nn.Linear in {type(model).__name__} "
            f"(its Linear layers: {shown or 'none'}). Fix: set target_modules to 'all-linear', a regex matching "
            "full module names, or a list of name fragments such as ['self_attn', 'mlp']; and make sure an "
            "adapter or freezing step has not frozen those layers"
        )
    return found


def split_by_identity(params: Iterable[Any], chosen: set[int]) -> tuple[list[Any], list[Any]]:
    inside, outside = [], []
    for p in params:
        (inside if id(p) in chosen else outside).append(p)
    return inside, outside
