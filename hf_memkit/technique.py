"""The Technique base class and its lifecycle.

The trainer wiring (``hf_memkit.integrations.trainer``) calls the hooks in this fixed order:

1. ``validate(ctx)``            model config, TrainingArguments, the other techniques; raise a typed error
2. ``estimate(mem)``            add this technique's terms to the memory estimate
3. ``patch_model(model)``       wrap modules / attach adapters; return a :class:`PatchHandle` (or ``None``)
4. ``create_optimizer(model, args)``  only the technique in the ``optimizer`` slot
5. ``loss(model, inputs, num_items_in_batch, return_outputs)``  only the technique in the ``loss`` slot;
   any technique may add a term through ``extra_loss(model, inputs, outputs)``
6. ``callbacks()``              TrainerCallbacks (schedules, mask refresh, QAT phases)
7. ``state_dict()`` / ``load_state_dict(state)``  saved in every checkpoint, restored on resume
8. ``finalize(model, output_dir)``  compression and export after training

Every hook is optional. A technique declares the slot it lives in, its pydantic config class, and what it
``conflicts`` with or ``requires`` (technique names, or ``slot:`` / ``training_args:`` references, see
:func:`hf_memkit.recipe.check_compatibility`).

Two optional extras: ``training_args(model_config)`` returns TrainingArguments fields the technique sets (the
``distributed`` slot fills ``deepspeed``/``fsdp``), and ``bind_trainer(trainer)``, when defined, is called once
the Trainer is built (CO2 uses it to reach the DDP wrapper and switch its per-step gradient sync off).

Distributed engines are a separate axis, declared in ``unsupported_engines``: the engines (see
:data:`hf_memkit.engines.ENGINES`: ``ddp``, ``zero1``, ``zero2``, ``zero3``, ``fsdp``, ``co2``) a
technique cannot run under, each mapped to the reason. Every engine not listed is supported. The recipe loader
checks the engine the recipe selects (``distributed:`` slot or ``training_args.deepspeed``/``fsdp``) and the
trainer wiring checks the engine the run actually uses (command-line ``--deepspeed``/``--fsdp``, or several
ranks = ``ddp``); the error names the reason and the engines that do work. The README's compatibility table is
generated from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from .number_checks import number_problem

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TechniqueConfig(BaseModel):
    """Base of every technique config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Every field of every subclass: a number field refuses ``true`` and ``"1e-3"`` (pydantic's lax mode
        would read 1 and 0.001) and ints beyond 64 bits; no field takes nan or inf, inside lists and mappings
        too. Runs before the field's own constraints (``gt=0`` lets inf through and says nan is "not > 0")."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None:
            problem = number_problem(value, field.annotation)
            if problem:
                raise ValueError(problem)
        return value


@dataclass
class ValidationContext:
    """What ``validate`` may look at. ``model_config`` is a transformers config (or None when validating a
    recipe alone), ``training_args`` the resolved TrainingArguments overrides of the recipe."""

    recipe: Any
    model_config: Any = None
    training_args: dict[str, Any] = field(default_factory=dict)
    trainer_has_optimizer: bool = False


class PatchHandle:
    """What ``patch_model`` returns: ``model`` is the module to train from now on (it may be a new wrapper
    such as a PeftModel), ``remove()`` undoes the patch and returns the original model object, unchanged bit
    for bit (parameters, buffers and ``requires_grad`` flags)."""

    def __init__(self, model: Any, undo: Callable[[], Any]):
        self.model = model
        self._undo = undo
        self.removed = False

    def remove(self) -> Any:
        if self.removed:
            raise RuntimeError("this patch was already removed; a handle undoes its patch once")
        self.removed = True
        return self._undo()


class Technique:
    """Base class. Subclasses set ``name``, ``slot`` and ``config_cls`` and override the hooks they need."""

    name: ClassVar[str] = ""
    slot: ClassVar[str] = ""
    config_cls: ClassVar[type[TechniqueConfig]] = TechniqueConfig
    #: what this technique cannot run with, mapped to the reason shown to the user. Keys are technique names
    #: (``"lisa"``), whole slots (``"slot:distributed"``) or TrainingArguments fields set in the recipe
    #: (``"training_args:optim"``)
    conflicts: ClassVar[dict[str, str]] = {}
    #: references (same syntax) that must be present in the recipe, mapped to the reason
    requires: ClassVar[dict[str, str]] = {}
    #: distributed engines this technique does not work under (``zero3``, ``fsdp``, ...; see the module
    #: docstring), mapped to why; everything else is supported
    unsupported_engines: ClassVar[dict[str, str]] = {}
    #: the parts of a model this technique patches (:data:`hf_memkit.integrations.patching.SURFACES` -> which
    #: modules, in words). Two techniques declaring the same part are refused when the recipe loads unless they
    #: declare a conflict (with its reason) instead; the patching layer enforces the same rule per module at run time
    patches: ClassVar[dict[str, str]] = {}
    #: whether ``patch_model`` replaces modules (SST's spectral layers, QAT's quantized Linears): such techniques
    #: patch before every other, so forward patches land on the modules that will run
    replaces_modules: ClassVar[bool] = False
    #: techniques whose patches overlap this one's but compose, mapped to how (the README's table shows it)
    composes: ClassVar[dict[str, str]] = {}
    #: one-line summary for ``memkit recipes list`` and the README table
    summary: ClassVar[str] = ""
    #: the paper or library this technique comes from
    reference: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    #: for techniques that hook library internals: package -> the version range it was verified on; outside
    #: it the run warns (:mod:`hf_memkit.integrations.versions`)
    verified_with: ClassVar[dict[str, str]] = {}
    #: whether ``extra_loss`` reads the model's ``outputs``. The loss wrapper asks the host's ``compute_loss`` for
    #: outputs only when the caller or such a technique needs them (TRL recomputes the logits with a whole extra
    #: forward pass when asked). None: True exactly when the subclass overrides ``extra_loss``
    extra_loss_needs_outputs: ClassVar[bool | None] = None

    def __init__(self, config: TechniqueConfig | None = None):
        self.config = config if config is not None else self.config_cls()

    # 1
    def validate(self, ctx: ValidationContext) -> None:
        """Raise a typed error (RecipeError, IncompatibleModelError) when this run cannot work."""

    def check_recipe(self, recipe: Any) -> None:
        """Raise a RecipeError for what the recipe alone rules out (no model, no machine checks: a recipe written
        for a GPU loads on a laptop). Called when the recipe loads; ``validate`` runs again with the model."""

    def training_args(self, model_config: Any = None) -> dict[str, Any]:
        """TrainingArguments fields this technique sets (the ``distributed`` slot fills ``deepspeed``/``fsdp``),
        given the model's config (None when there is no model yet). They sit under the recipe's own
        ``training_args``; flags given on the command line still win."""
        return {}

    # 2
    def estimate(self, mem: Any) -> None:
        """Add terms to ``mem`` (a :class:`hf_memkit.memory.estimate.MemoryEstimate`)."""

    def finish_estimate(self, mem: Any) -> None:
        """Called once every technique's ``estimate`` and the model's own activation terms are in: for a technique
        whose effect applies to whatever the others saved (offloading every saved tensor)."""

    # 3
    def patch_model(self, model: Any) -> PatchHandle | None:
        return None

    # 4
    def create_optimizer(self, model: Any, args: Any) -> "torch.optim.Optimizer | None":
        return None

    # 5
    def loss(self, model: Any, inputs: dict, num_items_in_batch: Any = None, return_outputs: bool = False):
        raise NotImplementedError(f"technique {self.name!r} sits in slot {self.slot!r} and computes no loss")

    def observe_loss(self, loss: "torch.Tensor", step: int) -> None:
        """Sees every micro-batch's training loss (``step``: optimizer steps done so far); guards raise here."""

    def extra_loss(self, model: Any, inputs: dict, outputs: Any) -> "torch.Tensor | None":
        """A term added to the training loss (router balance, distillation). ``None`` adds nothing."""
        return None

    # 6
    def callbacks(self) -> list:
        return []

    def wrap_optimizer(self, optimizer: Any, model: Any, args: Any) -> Any:
        """Return the optimizer the run uses in place of ``optimizer`` (or ``optimizer`` itself). Called once the
        optimizer exists, before ``optimizer_ready``: every technique outside the optimizer slot first, in
        recipe order (the precision slot writes 16-bit weights back), then the optimizer slot's own technique
        (gradient release wraps last, so it drives whatever the others built)."""
        return optimizer

    def optimizer_ready(self, optimizer: Any, args: Any, state: Any) -> None:
        """Called once the run's optimizer exists, before the Trainer announces the run: schedules set the
        parameters that train first (so the Trainer's trainable-parameter count is the real one)."""

    def describe(self, model: Any, optimizer: Any = None) -> str:
        """One line for the start-of-training block: what this technique did to *this* model (how many modules
        it wrapped, which layers train, which optimizer class and state dtype, ...). The default names the
        technique's summary and the settings that differ from their defaults."""
        changed = {k: v for k, v in self.config.model_dump().items()
                   if k in type(self.config).model_fields and v != type(self.config).model_fields[k].default}
        settings = ", ".join(f"{k}={v}" for k, v in changed.items())
        return f"{self.summary}" + (f" [{settings}]" if settings else "")

    # 7
    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-able values; saved next to every Trainer checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output read back from a checkpoint. The values come from a file, so check
        them (types, ranges, layer indices, tensor shapes) with :class:`hf_memkit.state_schema.StateReader`, which
        raises CheckpointError naming the key, the value and the fix; anything else raised here is reported as a
        corrupt checkpoint too."""
        if state:
            raise NotImplementedError(f"technique {self.name!r} saved state but cannot load it")

    # 8
    def finalize(self, model: Any, output_dir: str) -> None:
        """Compression and export after training."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
