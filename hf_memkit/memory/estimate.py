"""Analytic memory estimate before the run, from a model config and a recipe (no weights are built: the model
is instantiated on the meta device).

Categories (bytes): ``weights`` (frozen and trainable base weights in their storage format), ``adapter_weights``,
``gradients``, ``optimizer_states``, ``activations`` (tensors saved for backward), ``logits`` (output logits,
their fp32 upcast and gradient) and any technique-specific ones added through ``Technique.estimate``.

The activation term counts, per token and decoder layer of a Llama-style block, the tensors autograd keeps:
the inputs of both norms (4·h with their outputs), q/k/v after RoPE (q + 2·kv), the attention output and
the o_proj input (2·q), and the SwiGLU intermediates (4·i). With gradient checkpointing only each layer's input
(h) plus one layer's full set is kept. This is an approximation; the measured profiler is the yardstick.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: hooks run in this slot order: adapters decide what trains before optimizers size their state
ESTIMATE_ORDER = ("adapter", "schedule", "distributed", "optimizer", "loss", "activations", "compress")


@dataclass
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    numel: int
    storage_bytes: int
    trainable: bool
    category: str = "weights"
    note: str = ""


@dataclass
class Term:
    category: str
    source: str
    bytes: int
    note: str = ""


@dataclass
class MemoryEstimate:
    model: Any  # meta-device model
    batch_size: int
    seq_len: int
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    params: dict[str, ParamInfo] = field(default_factory=dict)
    terms: list[Term] = field(default_factory=list)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # --- hooks for techniques -----------------------------------------------------------------------------
    def add(self, category: str, nbytes: int, source: str, note: str = "") -> None:
        self.terms.append(Term(category, source, int(nbytes), note))

    def trainable(self) -> list[ParamInfo]:
        return [p for p in self.params.values() if p.trainable]

    def freeze_all(self) -> None:
        for p in self.params.values():
            p.trainable = False

    def add_param(self, name: str, shape: tuple[int, ...], *, trainable: bool, category: str) -> None:
        numel = 1
        for s in shape:
            numel *= s
        self.params[name] = ParamInfo(name, tuple(shape), numel, numel * self.dtype_bytes, trainable, category)

    def set_storage(self, name: str, nbytes: int, note: str = "") -> None:
        self.params[name].storage_bytes = int(nbytes)
        self.params[name].note = note

    def params_of_linears(self, skip: list[str] = ()) -> list[ParamInfo]:
        import torch

        out = []
        for n, m in self.model.named_modules():
            if type(m) is torch.nn.Linear and not any(n == s or n.endswith("." + s) for s in skip):
                key = n + ".weight"
                if key in self.params:
                    out.append(self.params[key])
        return out

    # --- totals ---------------------------------------------------------------------------------------------
    def categories(self) -> dict[str, int]:
        cats: dict[str, int] = {}
        for p in self.params.values():
            cats[p.category] = cats.get(p.category, 0) + p.storage_bytes
        for t in self.terms:
            cats[t.category] = cats.get(t.category, 0) + t.bytes
        return cats

    def total_bytes(self) -> int:
        return sum(self.categories().values())

    def to_dict(self) -> dict[str, Any]:
        cats = self.categories()
        return {
            **cats,
            "total_bytes": sum(cats.values()),
            "inputs": {"batch_size": self.batch_size, "seq_len": self.seq_len, "dtype": self.dtype,
                       "gradient_checkpointing": self.gradient_checkpointing},
            "terms": [asdict(t) for t in self.terms],
        }

    def table(self) -> str:
        cats = self.categories()
        width = max(len(c) for c in cats) if cats else 10
        lines = [f"{'category':<{width}}  {'MiB':>10}"]
        for c, b in cats.items():
            lines.append(f"{c:<{width}}  {b / 2**20:>10.1f}")
        lines.append(f"{'total':<{width}}  {sum(cats.values()) / 2**20:>10.1f}")
        return "\n".join(lines)


def _base_terms(mem: MemoryEstimate, config: Any) -> None:
    h = config.hidden_size
    n_layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    inter = getattr(config, "intermediate_size", 4 * h)
    tokens = mem.batch_size * mem.seq_len
    per_layer = (4 * h + 3 * q + 2 * kv + 4 * inter) * tokens * mem.dtype_bytes
    if mem.gradient_checkpointing:
        mem.add("activations", n_layers * h * tokens * mem.dtype_bytes + per_layer, "model",
                "checkpointed layer inputs + one layer recomputed")
    else:
        mem.add("activations", n_layers * per_layer, "model", f"{n_layers} layers x saved tensors")
    vocab = config.vocab_size
    # logits in the model dtype, their fp32 upcast for the loss, and the gradient of the logits
    mem.add("logits", tokens * vocab * (mem.dtype_bytes + 4 + 4), "model", "logits + fp32 upcast + grad")


def meta_model(config: Any):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def estimate_memory(model: Any, recipe: Any = None, *, batch_size: int = 1, seq_len: int = 512,
                    dtype: str = "float32") -> MemoryEstimate:
    """Estimate training memory for ``model`` (a name such as ``tiny``/``smollm2``, a local path, a
    transformers config or a model) under ``recipe``. Builds no weights."""
    from ..data.models import resolve_config
    from ..recipe import load_recipe

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_BYTES)}")
    config = resolve_config(model)
    recipe = load_recipe(recipe if recipe is not None else {})
    meta = meta_model(config)
    mem = MemoryEstimate(meta, batch_size, seq_len, dtype,
                         bool(recipe.training_args.get("gradient_checkpointing")
                              or recipe.training_args.get("activation_checkpointing")))
    seen: set[int] = set()
    for n, p in meta.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights are stored once
            continue
        seen.add(id(p))
        mem.params[n] = ParamInfo(n, tuple(p.shape), p.numel(), p.numel() * mem.dtype_bytes, True)
    techniques = recipe.build()
    for slot in ESTIMATE_ORDER:
        for t in techniques:
            if t.slot == slot:
                t.estimate(mem)
    for p in mem.trainable():
        mem.add("gradients", p.numel * mem.dtype_bytes, "autograd", "")
    if not recipe.slot("optimizer"):
        # the stock Trainer's default optimizer is AdamW (torch): two fp32 moments per trainable element
        mem.add("optimizer_states", sum(8 * p.numel for p in mem.trainable()), "trainer default adamw")
    _base_terms(mem, config)
    return mem
