"""Analytic memory estimate before the run, from a model config and a recipe (no weights are built: the model
is instantiated on the meta device).

Categories (bytes): ``weights`` (base weights in their storage format, plus buffers), ``adapter_weights``,
``gradients``, ``optimizer_states``, ``activations`` (tensors saved for backward, see
:mod:`hf_memkit.memory.activations`), ``logits`` (the fp32 log-probabilities the loss saves),
``loss_buffers`` (transient during the loss: the logits in the model dtype and their fp32 gradient),
``activations_recompute`` (gradient checkpointing: one layer's tensors while it is recomputed) and any
technique-specific category added through ``Technique.estimate``. The first six are what
:class:`~hf_memkit.memory.profiler.MemoryReportCallback` measures; the transient ones are estimate-only.

Order: parameters -> logits terms -> technique hooks (adapters first; they may freeze parameters, add
parameters, replace categories, mark ``needs_input``) -> saved activations (which depend on what trains) ->
gradients -> the stock AdamW state when no optimizer technique is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .activations import add_activation_terms

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: hooks run in this slot order, after the techniques that replace modules (:func:`estimate_sequence`):
#: adapters decide what trains before optimizers size their state, activation techniques see everything else
ESTIMATE_ORDER = ("adapter", "compress", "schedule", "distributed", "optimizer", "precision", "loss", "activations",
                  "guard")


def estimate_sequence(techniques: list) -> list:
    """The order the estimate hooks run in, the same rule as patching
    (:func:`hf_memkit.integrations.trainer.patch_sequence`): techniques that replace modules
    (``Technique.replaces_modules``: SST, the compress slot's before-training passes) first, so the others see
    ``replaced_linears``; then :data:`ESTIMATE_ORDER`, recipe order within a slot."""
    return sorted(techniques, key=lambda t: (not t.replaces_modules, ESTIMATE_ORDER.index(t.slot)))


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
    world_size: int = 1
    zero_stage: int = 0
    params: dict[str, ParamInfo] = field(default_factory=dict)
    terms: list[Term] = field(default_factory=list)
    #: tied parameter names -> the name they are stored under
    aliases: dict[str, str] = field(default_factory=dict)
    #: modules whose input autograd keeps even when their weight is frozen (e.g. LoRA without dropout)
    needs_input: set[str] = field(default_factory=set)
    #: adapter branches beside frozen Linears: (module, fan_in, rank, dropout); what a branch saves per token is
    #: the adapter's term, and activation techniques (Mesa, WTA-CRS) that cover the branch's Linears adjust it
    adapter_branches: list = field(default_factory=list)
    #: Linears computing with a weight view (AST's W ⊙ M, CAST's W ⊙ A) -> bytes of that view: a kernel technique
    #: covering such a Linear keeps the view tensor for its backward (patching layer: kernel + view)
    linear_views: dict = field(default_factory=dict)
    #: Linears replaced by another module type (SST's spectral layers, QAT's quantized ones): a technique covering
    #: nn.Linear (Mesa's kernel) does not reach them, and they keep their own saved input
    replaced_linears: set = field(default_factory=set)
    #: host RAM per rank for ZeRO CPU/NVMe offload (:mod:`hf_memkit.memory.host`), kept apart from the device
    #: categories: ``to_dict()["host_offload"]``
    host: dict[str, int] = field(default_factory=dict)
    #: the optimizer technique that steps inside backward (gradient release), else None
    gradient_release: str | None = None
    #: the predicted process peak once :meth:`predict_peak` ran: ``to_dict()["predicted_peak"]``
    prediction: dict[str, Any] | None = None

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # --- hooks for techniques -----------------------------------------------------------------------------
    def add(self, category: str, nbytes: int, source: str, note: str = "") -> None:
        self.terms.append(Term(category, source, int(nbytes), note))

    def replace_category(self, category: str, nbytes: int, source: str, note: str = "") -> None:
        """Drop every term of ``category`` so far and put one in its place (e.g. a fused loss that never
        materialises the logits replaces the model's ``logits`` term)."""
        self.terms = [t for t in self.terms if t.category != category]
        self.add(category, nbytes, source, note)

    def param(self, name: str) -> ParamInfo | None:
        return self.params.get(self.aliases.get(name, name))

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

        from ..integrations.anatomy import name_matches

        out = []
        for n, m in self.model.named_modules():
            if type(m) is torch.nn.Linear and not name_matches(n, skip):
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
        for cat in ZERO_PARTITIONS[self.zero_stage]:
            if cat in cats:
                cats[cat] = -(-cats[cat] // self.world_size)
        return cats

    def total_bytes(self) -> int:
        return sum(self.categories().values())

    def predict_peak(self, runtime_bytes: int | None = None, allocator: str | None = None) -> dict[str, Any]:
        """The process's peak RSS (and the device's ``max_memory_allocated``) for this estimate: see
        :func:`predict_process_peak`. Kept in :attr:`prediction` (``to_dict()["predicted_peak"]``)."""
        self.prediction = predict_process_peak(self, runtime_bytes, allocator)
        return self.prediction

    def to_dict(self) -> dict[str, Any]:
        cats = self.categories()
        extra = {"host_offload": {**self.host, "total_bytes": sum(self.host.values())}} if self.host else {}
        if self.prediction is not None:
            extra["predicted_peak"] = self.prediction
        return {
            **cats,
            **extra,
            "total_bytes": sum(cats.values()),
            "inputs": {"batch_size": self.batch_size, "seq_len": self.seq_len, "dtype": self.dtype,
                       "gradient_checkpointing": self.gradient_checkpointing, "world_size": self.world_size,
                       "zero_stage": self.zero_stage},
            "terms": [asdict(t) for t in self.terms],
        }

    def table(self) -> str:
        cats = self.categories()
        width = max(len(c) for c in cats) if cats else 10
        lines = [f"{'category':<{width}}  {'MiB':>10}"]
        for c, b in cats.items():
            lines.append(f"{c:<{width}}  {b / 2**20:>10.1f}")
        lines.append(f"{'total':<{width}}  {sum(cats.values()) / 2**20:>10.1f}")
        if self.host:
            lines.append("host RAM per rank (ZeRO offload)")
            for c, b in self.host.items():
                lines.append(f"  {c:<{width - 2}}  {b / 2**20:>10.1f}")
            lines.append(f"  {'total':<{width - 2}}  {sum(self.host.values()) / 2**20:>10.1f}")
        return "\n".join(lines)


def _logit_terms(mem: MemoryEstimate, config: Any) -> None:
    tokens = mem.batch_size * mem.seq_len
    vocab = config.vocab_size
    mem.add("logits", tokens * vocab * 4, "model", "fp32 log-probabilities saved by the cross-entropy")
    mem.add("loss_buffers", tokens * vocab * (mem.dtype_bytes + 4), "model",
            "transient: logits in the model dtype + their fp32 gradient")


def meta_model(config: Any):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


#: ZeRO stage -> the categories it partitions across data-parallel ranks (Rajbhandari et al. 2020)
ZERO_PARTITIONS = {0: (), 1: ("optimizer_states",), 2: ("optimizer_states", "gradients"),
                   3: ("optimizer_states", "gradients", "weights", "adapter_weights")}


#: config fields the activation model reads (Llama-family decoders: Llama, Mistral, Qwen2/3, Gemma, SmolLM)
MODELLED_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")


def _check_modelled(config: Any) -> None:
    missing = [f for f in MODELLED_FIELDS if not isinstance(getattr(config, f, None), int)]
    if missing:
        from ..errors import IncompatibleModelError

        raise IncompatibleModelError(
            f"the memory estimator models Llama-family decoders (q/k/v/o and gate/up/down projections, RMSNorm); "
            f"{type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r}) has no "
            f"{', '.join(missing)}, so its activations cannot be predicted. Fix: measure instead: `memkit train` "
            "writes the measured memory report, or add hf_memkit.memory.profiler.MemoryReportCallback to a Trainer"
        )


def estimate_memory(model: Any, recipe: Any = None, *, batch_size: int = 1, seq_len: int = 512,
                    dtype: str = "float32", world_size: int = 1, zero_stage: int = 0) -> MemoryEstimate:
    """Estimate per-rank training memory for ``model`` (a name such as ``tiny``/``smollm2``, a local path, a
    transformers config or a model) under ``recipe``. Builds no weights. With ``world_size`` > 1 and a ZeRO
    stage, the partitioned categories are divided by the number of ranks (activations and logits are per
    rank already: ``batch_size`` is the per-device batch). A ``distributed: {deepspeed: ...}`` recipe sets the
    ZeRO stage itself and, with offload, adds the host-RAM terms (``to_dict()["host_offload"]``)."""
    from ..data.models import resolve_config
    from ..recipe import load_recipe

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_BYTES)}")
    config = resolve_config(model)
    recipe = load_recipe(recipe if recipe is not None else {})
    _check_modelled(config)
    meta = meta_model(config)
    mem = MemoryEstimate(meta, batch_size, seq_len, dtype,
                         bool(recipe.training_args.get("gradient_checkpointing")
                              or recipe.training_args.get("activation_checkpointing")))
    if zero_stage not in ZERO_PARTITIONS:
        raise ValueError(f"ZeRO stage {zero_stage!r} does not exist; use 0, 1, 2 or 3")
    if world_size < 1:
        raise ValueError(f"world size must be at least 1 (got {world_size})")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch size and sequence length must be at least 1 (got {batch_size} and {seq_len})")
    mem.world_size, mem.zero_stage = world_size, zero_stage  # before the hooks: distributed ones read them
    first: dict[int, str] = {}
    for n, p in meta.named_parameters(remove_duplicate=False):
        if id(p) in first:  # tied weights are stored once
            mem.aliases[n] = first[id(p)]
            continue
        first[id(p)] = n
        mem.params[n] = ParamInfo(n, tuple(p.shape), p.numel(), p.numel() * mem.dtype_bytes, True)
    for n, b in meta.named_buffers():
        mem.add("weights", b.numel() * b.element_size(), "buffers", n)
    _logit_terms(mem, config)  # before the hooks, so that techniques can replace them
    techniques = recipe.build()
    for t in estimate_sequence(techniques):
        t.estimate(mem)
    add_activation_terms(mem, config)
    for t in techniques:
        t.finish_estimate(mem)
    for p in mem.trainable():
        mem.add("gradients", p.numel * mem.dtype_bytes, "autograd", "")
    if mem.gradient_release:  # the optimizer steps each parameter in backward and frees its gradient at once
        # a parameter stored narrower than the model dtype (precision slot) has a gradient of its storage dtype
        sizes = [p.numel * min(mem.dtype_bytes, max(1, p.storage_bytes // max(p.numel, 1))) for p in mem.trainable()]
        mem.replace_category("gradients", max(sizes, default=0), mem.gradient_release,
                             "gradient release: one gradient alive at once (no accumulation)")
    if not recipe.slot("optimizer"):
        # the stock Trainer's default optimizer is AdamW (torch): two fp32 moments per trainable element
        mem.add("optimizer_states", sum(8 * p.numel for p in mem.trainable()), "trainer default adamw")
    return mem


# --- the process peak -------------------------------------------------------------------------------------------

#: what is alive in each phase of a step besides the persistent categories (every category not named here:
#: weights, adapter weights, optimizer state, technique state). The peak of the step's tensors is the largest
#: phase. forward: at the end of the loss, every saved tensor and the loss's buffers; backward: while a
#: checkpointed layer is recomputed, the saved tensors, that layer's set and the gradients (all counted whole:
#: exact for adapters, whose gradients are small; for a full fine-tune an upper bound by the part of the
#: activations already freed); optimizer: the gradients. The precision technique's fp32 scratch (a weight block
#: upcast in a Linear, or one weight and its gradient in the step) is alive in every phase. Measured with the
#: profiled step (:mod:`hf_memkit.memory.peak`), default recipe: SmolLM2 (fp32 base, 4 x 256) peaks at the end of
#: the forward with 130.5 MiB above the persistent tensors where this says 129.8 (backward); with the bf16 base,
#: 137.1 MiB at the end of the forward where this says 133.4 (forward) and 145.8 (backward); the tiny model in
#: backward with 5.7 MiB where this says 4.9
PHASE_TERMS: dict[str, tuple[str, ...]] = {
    "forward": ("activations", "logits", "loss_buffers", "precision_buffers"),
    "backward": ("activations", "activations_recompute", "gradients", "precision_buffers"),
    "optimizer": ("gradients", "precision_buffers"),
}
STEP_CATEGORIES = frozenset(c for terms in PHASE_TERMS.values() for c in terms)

#: allocator -> expected slack at the process peak (bytes the allocator keeps after frees) per byte allocated and
#: freed within a step (the step categories: activations, logits, loss buffers, recompute, gradients, precision
#: scratch). Calibrated with :data:`RUN_OVERHEAD`, see :data:`CALIBRATION`
SLACK: dict[str, float] = {"glibc": 8.0, "glibc_fixed": 0.9, "mimalloc": 0.67, "other": 1.0}
#: allocator -> the most slack expected (bytes). The slack does not keep growing with the step's bytes: on
#: SmolLM2-135M (4 x 256, 40 steps, bench_peak.py 2026-12-07) the stock Trainer's full AdamW step (3.4 GiB of step
#: tensors) left 526 MiB of slack + unaccounted under glibc where its LoRA + checkpointing run (1.2 GiB) left
#: 1,512, and memkit's ``lora`` recipe without checkpointing (2.6 GiB of step bytes) 353 MiB under mimalloc where
#: ``qlora`` (0.7 GiB) left 603. Capped, the linear model predicts those rows within +2.8% (lora), +9.6%
#: (stock AdamW), -16% (stock LoRA) and -14% (qlora, whose slack is the largest seen under mimalloc); uncapped it
#: said +36%, +411%, +125% and -14%. Fitted on one model: a larger model's slack may exceed the cap
SLACK_CAP: dict[str, int] = {"glibc": 900 * 2**20, "glibc_fixed": 900 * 2**20, "mimalloc": 400 * 2**20,
                             "other": 900 * 2**20}
#: what a run holds beyond the imported libraries, the tensors and the slack: tokenizer, datasets, the Trainer's
#: objects, the libraries the techniques import after the model loaded (the measured breakdown's ``unaccounted``
#: plus the library pages that came after the ``load`` mark)
RUN_OVERHEAD = 64 * 2**20
#: how SLACK and RUN_OVERHEAD were measured (memory_report.json of ``memkit train``'s code path, runtime = RSS at
#: the ``load`` mark, profiled step 2 of 4, default recipe; 2 CPU cores shared with other test runs, so RSS
#: growth over the steps may differ on an idle machine). Residual R = peak - runtime - predicted tensors, MiB,
#: with step bytes s (tiny 8 x 128 tokens: 6.95 MiB; SmolLM2-135M 4 x 256: 184.6 MiB with the fp32 base, 190.9
#: with the bf16 base, whose runtime was 610 MiB and tensors 431.6):
CALIBRATION = """
allocator      tiny: peak  R      SmolLM2: peak  R       fit R = 64 MiB + SLACK x s   (errors of the fit)
glibc (stock)        684   68        fp32 2817   1535    8.0   (tiny +51 MiB, +7.5%: the stock heap's slack
                                                               grows step after step: 2340/2672/2775/2817)
glibc_fixed          689   73        fp32 1578   296     0.9   (tiny -3; fp32 -66 MiB, -4.2%;
                                     bf16 1217   176           bf16 +60 MiB, +4.9%)
mimalloc             757   102       fp32 1511   188     0.67  (tiny -33 MiB, -4.4%; and a mimalloc process
                                                               starts ~40 MiB larger than the glibc process
                                                               that usually measures the runtime)
"""


def expected_allocator() -> str:
    """The allocator a ``memkit train`` started now would run on: ``mimalloc`` (installed, auto/mimalloc),
    ``glibc_fixed`` (glibc with the fixed mmap threshold: auto/glibc), ``glibc`` (system), or ``other``."""
    from . import process

    try:
        from . import host_memory

        choice = host_memory.choice()
        if choice != "system" and host_memory.wants_mimalloc(choice):
            return "mimalloc"
        if process.allocator_name() == "glibc":
            return "glibc" if choice == "system" else "glibc_fixed"
    except Exception:
        pass
    return process.allocator_kind()


def predict_process_peak(mem: MemoryEstimate, runtime_bytes: int | None = None,
                         allocator: str | None = None) -> dict[str, Any]:
    """Predicted peak RSS of a training process (bytes):

    ``runtime`` (the RSS of the process once what a Trainer run imports is imported: ``runtime_bytes``, else
    measured here with :func:`hf_memkit.memory.process.runtime_rss_bytes`, which is only right in a process that
    has no model loaded yet) + :data:`RUN_OVERHEAD` + the persistent tensors + the largest phase of a step
    (:data:`PHASE_TERMS`) + the expected slack of ``allocator`` (:data:`SLACK` x the bytes allocated and freed, at most :data:`SLACK_CAP`
    within a step; default :func:`expected_allocator`). ``device_peak_bytes``: what ``max_memory_allocated``
    would show with everything on the device (tensors only, no runtime, overhead or slack).

    ``breakdown`` uses the measured breakdown's parts (``memory/profiler.py: BREAKDOWN``), with
    :data:`RUN_OVERHEAD` as ``unaccounted``; the parts sum to ``peak_bytes``. Calibration: :data:`CALIBRATION`."""
    from . import process

    cats = mem.categories()
    persistent = {k: v for k, v in cats.items() if k not in STEP_CATEGORIES}
    phases = {ph: sum(cats.get(c, 0) for c in terms) for ph, terms in PHASE_TERMS.items()}
    phase = max(phases, key=lambda k: phases[k])
    tensors = sum(persistent.values()) + phases[phase]
    allocator = allocator or expected_allocator()
    step_bytes = sum(cats.get(c, 0) for c in STEP_CATEGORIES)
    slack = min(int(SLACK.get(allocator, SLACK["other"]) * step_bytes), SLACK_CAP.get(allocator, SLACK_CAP["other"]))
    runtime = int(runtime_bytes) if runtime_bytes is not None else process.runtime_rss_bytes()
    # the same parts as the measured breakdown (memory/profiler.py: BREAKDOWN): the phase's step categories that
    # the measurement tags keep their names, the others are its transients
    breakdown: dict[str, int] = {"runtime": runtime}
    for k in ("weights", "adapter_weights", "optimizer_states"):
        breakdown[k] = persistent.get(k, 0)
    alive = PHASE_TERMS[phase]
    for k in ("gradients", "activations", "logits"):
        breakdown[k] = cats.get(k, 0) if k in alive else 0
    breakdown["transients"] = sum(cats.get(c, 0) for c in alive if c not in ("gradients", "activations", "logits"))
    for k, v in persistent.items():
        breakdown.setdefault(k, v)
    breakdown["slack"] = slack
    breakdown["unaccounted"] = RUN_OVERHEAD
    return {
        "peak_bytes": runtime + RUN_OVERHEAD + tensors + slack,
        "breakdown": breakdown,
        "runtime": runtime,
        "run_overhead": RUN_OVERHEAD,
        "tensors": tensors,
        "persistent": sum(persistent.values()),
        "phase": phase,
        "phases": phases,
        "slack": slack,
        "allocator": allocator,
        "device_peak_bytes": tensors,
    }
