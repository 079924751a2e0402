"""One model anatomy and one target matcher (docs/DESIGN.md, "Model anatomy").

Every technique that needs to know where a model's parts are asks here, so that all of them agree on names and
an unknown architecture fails in one place with one message:

* :func:`anatomy` — the decoder layers, the attention and MLP Linears inside each layer, the embeddings, the
  output head and the final norm, found from a small family table and then from the module tree (the
  ``ModuleList`` of ``num_hidden_layers`` identical blocks; failing that, the longest list of identical blocks
  holding Linear layers). It runs on the real model, on a PEFT-wrapped one (names keep the
  ``base_model.model.`` prefix) and on the estimator's meta-device copy.
* :func:`target_linears` — ``target_modules`` means what it means in PEFT, everywhere: a string is a regex that
  must match a module's whole name (relative to the transformers model, as PEFT sees it), a list selects a module
  whose name equals an entry or ends with ``.entry``, and ``"all-linear"`` is every Linear / GPT-2 ``Conv1D``
  except the output head. The per-name test is PEFT's own ``check_target_module_exists``, so ``exclude_modules``,
  ``layers_to_transform`` and ``layers_pattern`` behave as in a ``LoraConfig``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterable

from ..errors import IncompatibleModelError

#: layer-list paths, most common first (Llama/Mistral/Qwen2/Gemma/SmolLM, GPT-2, GPT-NeoX, OPT, Falcon/MPT)
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks",
               "layers")
#: names of a layer's attention child, per family (Llama/OPT, GPT-2, NeoX, Falcon)
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
#: names of a layer's MLP child; a family without one (OPT's fc1/fc2) counts every Linear outside attention
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
#: role names accepted in ``always_train`` besides parameter-name patterns
ROLES = ("embeddings", "lm_head", "final_norm")
ALL_LINEAR = "all-linear"


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def unwrap(model: Any) -> tuple[Any, str]:
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


def linear_types() -> tuple[type, ...]:
    """``nn.Linear`` (bitsandbytes' and our quantized layers subclass it) and GPT-2's ``Conv1D``."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def is_norm(module: Any) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name and not any(True for _ in module.children())


def is_adapter_wrapper(module: Any) -> bool:
    """A PEFT tuner layer (or anything else that keeps the layer it wraps at ``base_layer``)."""
    return getattr(module, "base_layer", None) is not None


def parameter_names(model: Any) -> dict[int, str]:
    """id(parameter) -> its (first) name; tied parameters resolve to one name."""
    out: dict[int, str] = {}
    for n, p in model.named_parameters():
        out.setdefault(id(p), n)
    return out


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


@dataclass
class Anatomy:
    """Where a model's parts are. Module names are full names in ``model.named_modules()``."""

    model_class: str
    family: str
    layers: DecoderLayers
    #: the attention child's name inside a layer (``self_attn``), or None when a layer has none by that name
    attention: str | None
    #: the MLP child's name inside a layer (``mlp``), or None (OPT: fc1/fc2 sit in the layer itself)
    mlp: str | None
    embeddings: list[str]
    head: str | None
    final_norm: list[str]

    def block_linears(self, i: int, part: str | None = None) -> list[tuple[str, Any]]:
        """The base Linear / Conv1D layers of layer ``i`` (an adapter wrapper counts as the layer it wraps, not
        its inner Linears); ``part`` = ``"attention"`` or ``"mlp"`` narrows to one side. With no MLP child,
        ``"mlp"`` is every Linear outside the attention child."""
        if part not in (None, "attention", "mlp"):
            raise ValueError(f"part must be None, 'attention' or 'mlp', not {part!r}")
        pre = self.layers.prefix(i)
        out = []
        for rel, m in base_linears(self.layers.modules[i]):
            in_attn = self.attention is not None and (rel == self.attention or rel.startswith(self.attention + "."))
            in_mlp = (self.mlp is not None and (rel == self.mlp or rel.startswith(self.mlp + "."))) or \
                     (self.mlp is None and not in_attn)
            if part is None or (part == "attention" and in_attn) or (part == "mlp" and in_mlp):
                out.append((pre + rel, m))
        return out

    def role_parameters(self, model: Any, role: str) -> set[str]:
        """Parameter names of a role: ``embeddings`` = the Embedding modules outside the layers (token and
        position embeddings), ``lm_head`` = the output embeddings (one name when tied), ``final_norm`` = the
        normalisation modules outside the layers."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        names = parameter_names(model)
        modules = dict(model.named_modules())
        wanted = {"embeddings": self.embeddings, "lm_head": [self.head] if self.head else [],
                  "final_norm": self.final_norm}[role]
        return {names[id(p)] for mname in wanted for p in modules[mname].parameters() if id(p) in names}


def base_linears(module: Any) -> list[tuple[str, Any]]:
    """``(relative name, layer)`` for the Linear / Conv1D layers under ``module``, an adapter wrapper standing for
    the layer it wraps (its ``base_layer`` and adapter Linears are not listed separately)."""
    kinds = linear_types()
    out, skip = [], []
    for rel, m in module.named_modules():
        if any(rel.startswith(s) for s in skip):
            continue
        if is_adapter_wrapper(m):
            skip.append(rel + "." if rel else "")
            out.append((rel, m))
        elif isinstance(m, kinds):
            out.append((rel, m))
    return out


def _find_layers(inner: Any, attribute: str | None, key: str) -> tuple[str, Any]:
    import torch

    if attribute:
        found = _get(inner, attribute)
        if not isinstance(found, torch.nn.ModuleList):
            raise IncompatibleModelError(
                f"{key}: layers_attribute {attribute!r} is not a ModuleList of {type(inner).__name__} "
                f"(got {type(found).__name__}); name the attribute that holds the decoder layers, e.g. "
                f"{', '.join(LAYER_PATHS[:2])}"
            )
        return attribute, found
    for cand in LAYER_PATHS:
        obj = _get(inner, cand)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return cand, obj
    lists = [(n, m) for n, m in inner.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0
             and len({type(b) for b in m}) == 1]
    n = num_hidden_layers(getattr(inner, "config", None))
    for name, m in lists:
        if n and len(m) == n:
            return name, m
    kinds = linear_types()
    with_linears = [(name, m) for name, m in lists if any(isinstance(x, kinds) for x in m[0].modules())]
    if with_linears:
        return max(with_linears, key=lambda nm: len(nm[1]))
    raise IncompatibleModelError(
        f"{key}: cannot find the decoder layers of {type(inner).__name__}: none of {', '.join(LAYER_PATHS)} "
        "exists and no ModuleList of identical blocks holds Linear layers. Fix: set layers_attribute to the "
        "dotted path of its layer ModuleList (techniques that have one), or use a decoder-only *ForCausalLM"
    )


def _child(block: Any, candidates: Iterable[str]) -> str | None:
    children = dict(block.named_children())
    return next((c for c in candidates if c in children), None)


def anatomy(model: Any, *, key: str = "memkit", layers_attribute: str | None = None) -> Anatomy:
    """The anatomy of ``model`` (see the module docstring); raises IncompatibleModelError naming what was not
    found. ``layers_attribute`` (a dotted path inside the transformers model) overrides the layer lookup."""
    import torch

    inner, outer = unwrap(model)
    path, found = _find_layers(inner, layers_attribute, key)
    full = outer + path
    layers = DecoderLayers(full, list(found))
    for i, block in enumerate(found):
        for n, _ in block.named_parameters():
            layers.layer_of[f"{full}.{i}.{n}"] = i
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((n for n, m in model.named_modules() if head_module is not None and m is head_module), None)
    inside = full + "."
    embeddings, final_norm = [], []
    for name, m in model.named_modules():
        if name == full or name.startswith(inside):
            continue
        if isinstance(m, torch.nn.Embedding):
            embeddings.append(name)
        elif is_norm(m):
            final_norm.append(name)
    config = getattr(inner, "config", None)
    block = found[0]
    return Anatomy(type(inner).__name__, str(getattr(config, "model_type", "") or ""), layers,
                   _child(block, ATTENTION_NAMES), _child(block, MLP_NAMES), embeddings, head, final_norm)


def find_decoder_layers(model: Any, attribute: str | None = None, key: str = "schedule") -> DecoderLayers:
    """The decoder layer list of ``model``; ``attribute`` (a dotted path) overrides the lookup."""
    return anatomy(model, key=key, layers_attribute=attribute).layers


def role_parameters(model: Any, layers: DecoderLayers, role: str) -> set[str]:
    """Parameter names of ``role`` (see :meth:`Anatomy.role_parameters`) for the layers already found."""
    import torch

    names = parameter_names(model)
    inside = layers.path + "."
    if role == "lm_head":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {names[id(p)] for p in head.parameters() if id(p) in names} if head is not None else set()
    out: set[str] = set()
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


# --- the target matcher ------------------------------------------------------------------------------------


def is_all_linear(target: Any) -> bool:
    return isinstance(target, str) and target.replace("_", "-") == ALL_LINEAR


def name_matches(name: str, names: Iterable[str]) -> bool:
    """PEFT's rule for a list of module names (``target_modules``, ``exclude_modules``; our ``skip_modules``):
    ``name`` equals an entry or ends with ``.entry``."""
    return any(name == s or name.endswith("." + s) for s in names)


def peft_matches(target: "str | list[str]", name: str, *, exclude: "str | list[str] | None" = None,
                 layers_to_transform: "int | list[int] | None" = None,
                 layers_pattern: "str | list[str] | None" = None) -> bool:
    """Does PEFT's rule select module ``name`` (relative to the transformers model) for ``target``?"""
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    cfg = SimpleNamespace(target_modules=target, exclude_modules=exclude, modules_to_save=None,
                          target_parameters=None, layers_to_transform=layers_to_transform,
                          layers_pattern=layers_pattern)
    hit = check_target_module_exists(cfg, name)
    return bool(hit) and not isinstance(hit, _ExcludedModule)


def _head_and_embeddings(model: Any) -> tuple[set[str], set[int]]:
    from torch import nn

    ids: set[int] = set()
    heads: set[str] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if module is not None and getattr(module, "weight", None) is not None:
            ids.add(id(module.weight))
        if getter == "get_output_embeddings" and module is not None:
            heads |= {n for n, m in model.named_modules() if m is module}
    ids |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if not heads:
        heads = {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}
    return heads, ids


def output_head_names(model: Any) -> set[str]:
    return _head_and_embeddings(model)[0]


def embedding_parameter_ids(model: Any) -> set[int]:
    """ids of the input embedding, the output head and every ``nn.Embedding`` weight (tied ones included)."""
    return _head_and_embeddings(model)[1]


def target_linears(model: Any, target: "str | list[str]", *, key: str, trainable_only: bool = False,
                   exact_type: bool = False, exclude: "str | list[str] | None" = None,
                   layers_to_transform: "int | list[int] | None" = None) -> list[tuple[str, Any]]:
    """``(full module name, layer)`` for the Linear / Conv1D layers ``target`` selects, PEFT's way (see the
    module docstring). A selected adapter wrapper (a LoRA layer) contributes the Linears inside it, so that
    "``q_proj``" in a PEFT model reaches the adapter's trainable ``lora_A``/``lora_B``. ``exact_type`` keeps
    plain ``nn.Linear`` only (not quantized subclasses, not Conv1D); ``trainable_only`` drops frozen weights.
    Raises IncompatibleModelError, naming the model's Linear layers, when nothing is selected or when a list
    entry names a module that is not a Linear (PEFT refuses those too)."""
    from torch import nn

    inner, outer = unwrap(model)
    kinds = (nn.Linear,) if exact_type else linear_types()
    heads, embedded = _head_and_embeddings(model)
    everything = is_all_linear(target)
    candidates = base_linears(model)
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def take(name: str, m: Any) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        if (type(m) is nn.Linear) if exact_type else isinstance(m, kinds):
            w = getattr(m, "weight", None)
            if not trainable_only or (w is not None and w.requires_grad):
                found.append((name, m))

    if everything:
        for name, m in candidates:
            if name in heads or id(getattr(m, "weight", None)) in embedded:
                continue
            if is_adapter_wrapper(m):
                for rel, sub in m.named_modules():
                    if rel:
                        take(f"{name}.{rel}", sub)
            else:
                take(name, m)
    else:
        if not isinstance(target, (str, list, tuple, set)) or not target:
            raise IncompatibleModelError(
                f"{key}: target_modules={target!r} is not a regex string, a list of module names or 'all-linear'"
            )
        target = target if isinstance(target, str) else list(target)
        not_linear = []
        for name, m in model.named_modules():
            rel = name[len(outer):] if outer and name.startswith(outer) else name
            if not rel or (outer and not name.startswith(outer)):
                continue
            if not peft_matches(target, rel, exclude=exclude, layers_to_transform=layers_to_transform):
                continue
            if is_adapter_wrapper(m):
                for sub_rel, sub in m.named_modules():
                    if sub_rel:
                        take(f"{name}.{sub_rel}", sub)
            elif isinstance(m, linear_types()):
                take(name, m)
            else:
                not_linear.append(f"{rel} ({type(m).__name__})")
        if not_linear and not isinstance(target, str):
            sample = sorted({n.rsplit('.', 1)[-1] for n, _ in base_linears(inner)})
            raise IncompatibleModelError(
                f"{key}: target_modules={target!r} names modules that are not Linear layers: "
                f"{', '.join(not_linear[:3])}{', ...' if len(not_linear) > 3 else ''}. target_modules means what "
                "it means in PEFT: a module whose name equals an entry or ends with '.<entry>', or a regex over "
                f"the whole name. Fix: name the Linear layers ({', '.join(sample[:8])}) or use 'all-linear'"
            )
    if not found:
        names = [n if type(m) is nn.Linear else f"{n} ({type(m).__name__})" for n, m in candidates]
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise IncompatibleModelError(
            f"{key}: target_modules={target!r} selects no {'trainable ' if trainable_only else ''}"
            f"{'nn.Linear' if exact_type else 'Linear'} in {type(inner).__name__} (its Linear layers: "
            f"{shown or 'none'}). target_modules means what it means in PEFT: 'all-linear', a list of module "
            "names matched as whole names or '.'-suffixes (e.g. ['q_proj', 'v_proj']), or a regex over the whole "
            "module name; make sure an adapter or freezing step has not frozen those layers"
        )
    return found
