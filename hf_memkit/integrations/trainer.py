"""Trainer wiring: the one place where a recipe meets ``transformers.Trainer``.

HF callbacks can neither swap the loss nor the optimizer, so the wiring replaces four methods *on the trainer
instance* (never on the class): ``create_optimizer``, ``compute_loss``, ``_save_checkpoint`` and ``train``.
:class:`MemkitTrainer` and :func:`apply_recipe` share this code; the stock-script launcher calls it from a
scoped patch of ``Trainer.__init__``.

Order of the lifecycle (see :mod:`hf_memkit.technique`): validate -> patch_model (before ``Trainer.__init__``
where possible, so its checks see the adapter) -> create_optimizer / loss / callbacks during ``train`` ->
state saved into every checkpoint, restored on resume -> finalize after training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

from ..errors import CheckpointError, RecipeError
from ..recipe import Recipe, load_recipe
from ..technique import PatchHandle, Technique, ValidationContext
from .memkit_state import STATE_DIR, STATE_JSON, STATE_TENSORS  # noqa: F401  (re-exported: the layout's names)

logger = logging.getLogger("hf_memkit")

#: patch order: adapters first (they decide what trains), optimizers never patch the model; precision after the
#: adapter (it stores the LoRA base layers in 16 bits, the adapters stay fp32) and after the loss (whose probe
#: compares the model's own logits with lm_head's while the weights are still as loaded)
PATCH_ORDER = ("adapter", "schedule", "activations", "loss", "precision", "distributed", "compress", "optimizer",
               "guard")


def patch_sequence(techniques: list[Technique]) -> list[Technique]:
    """The order ``patch`` applies techniques in: those that replace modules (``Technique.replaces_modules``: SST's
    spectral layers, QAT's quantized layers) first, so that the techniques that patch forwards see the modules
    that will run, then by :data:`PATCH_ORDER`, recipe order within a slot."""
    return sorted(techniques, key=lambda t: (not t.replaces_modules, PATCH_ORDER.index(t.slot)))


class RecipeRuntime:
    """The techniques of one recipe, instantiated for one run."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.techniques: list[Technique] = recipe.build()
        self.handles: list[PatchHandle] = []
        self.original_model: Any = None
        self._restore_kernels: Any = None  # turns transformers' hub kernels back on after unpatch
        #: the final save_model writes the model card (memkit train turns it off: it writes a fuller one itself)
        self.writes_card = True
        #: the run's energy report, when it was measured (HF_MEMKIT_ENERGY, see run_card.energy_callback)
        self.energy: Any = None

    def of_slot(self, slot: str) -> Technique | None:
        return next((t for t in self.techniques if t.slot == slot), None)

    # validate -------------------------------------------------------------------------------------------------
    def validate(self, model: Any, training_args: dict, trainer_has_optimizer: bool = False) -> None:
        ctx = ValidationContext(self.recipe, getattr(model, "config", None), dict(training_args),
                                trainer_has_optimizer)
        for t in self.techniques:
            t.validate(ctx)

    def training_args(self, model: Any = None) -> dict[str, Any]:
        """The TrainingArguments this run sets: the techniques' own (``distributed`` fills ``deepspeed``/``fsdp``)
        under the recipe's ``training_args``."""
        config = getattr(model, "config", None)
        out: dict[str, Any] = {}
        for t in self.techniques:
            out.update(t.training_args(config))
        out.update(self.recipe.training_args)
        return out

    def check_engine(self, args: Any) -> None:
        """The engine the run really uses (command-line ``--deepspeed``/``--fsdp`` included) against every
        technique's ``unsupported_engines``."""
        from ..engines import args_engine, check_engine

        dist_t = self.of_slot("distributed")
        engine = args_engine(args)
        if engine == "ddp" and dist_t is not None and dist_t.name == "co2":
            engine = "co2"
        check_engine(self.techniques, engine, path=self.recipe.source,
                     extra_engine="ddp" if engine == "co2" else None)

    # patch ----------------------------------------------------------------------------------------------------
    def patching(self) -> list[str]:
        """The techniques that patch the model (override ``patch_model``)."""
        return [t.name for t in self.techniques if type(t).patch_model is not Technique.patch_model]

    def patch(self, model: Any) -> Any:
        if self.handles:
            raise RuntimeError("this recipe is already applied to a model; build a new runtime for another")
        self.original_model = model
        from .trl import check_adapter_host
        from ..memory.host_memory import AllocatorError, release_host_memory
        from .versions import warn_unverified

        warn_unverified(self.techniques)
        check_adapter_host(model, self.recipe)  # TRL's peft_config and a recipe adapter would stack two adapters
        try:  # freed host memory goes back to the OS on every run (glibc: fixed mmap threshold; mimalloc: as is)
            release_host_memory()
        except AllocatorError as exc:
            logger.warning("hf_memkit: %s", exc)
        patching = self.patching()
        if patching:
            from .hub_kernels import disable_hub_kernels

            self._restore_kernels = disable_hub_kernels(
                model, f"{', '.join(patching)} patch module forwards, which kernelize would undo")
        for t in patch_sequence(self.techniques):
            try:
                handle = t.patch_model(model)
            except Exception:
                self.unpatch()
                raise
            if handle is not None:
                self.handles.append(handle)
                model = handle.model
        return model

    def unpatch(self) -> Any:
        model = self.original_model
        while self.handles:
            model = self.handles.pop().remove()
        restore, self._restore_kernels = self._restore_kernels, None
        if restore is not None:
            restore()
        return model

    # say what happened -------------------------------------------------------------------------------------------
    def describe(self, model: Any, optimizer: Any = None) -> list[str]:
        """The start-of-training block: each technique and what it did to this model, then what trains now."""
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        base = getattr(model, "get_base_model", lambda: model)()
        lines = [f"hf_memkit: recipe {self.recipe.source} on {type(base).__name__} "
                 f"({total / 1e6:.1f}M parameters)"]
        for t in self.techniques:
            lines.append(f"  {t.slot:<12} {t.name:<16} {t.describe(model, optimizer)}")
        if not self.techniques:
            lines.append("  (no techniques: a stock Trainer run)")
        lines.append(f"  trainable now: {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
        return lines

    # loss -----------------------------------------------------------------------------------------------------
    def compute_loss(self, default, model, inputs, return_outputs=False, num_items_in_batch=None):
        # outputs only when someone reads them: TRL's compute_loss pays a second forward pass to build them
        adders = [t for t in self.techniques if type(t).extra_loss is not Technique.extra_loss]
        need = return_outputs or any(t.extra_loss_needs_outputs is not False for t in adders)
        loss_t = self.of_slot("loss")
        if loss_t is not None:
            result = loss_t.loss(model, inputs, num_items_in_batch=num_items_in_batch, return_outputs=need)
        else:
            result = default(model, inputs, return_outputs=need, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if need else (result, None)
        for t in adders:
            extra = t.extra_loss(model, inputs, outputs)
            if extra is not None:
                loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    # state ----------------------------------------------------------------------------------------------------
    def stateful(self) -> list[str]:
        """The techniques that keep state now (a checkpoint of this run must carry ``memkit_state/``)."""
        return [t.name for t in self.techniques if t.state_dict()]

    def save_state(self, checkpoint_dir: str) -> None:
        from .memkit_state import write_state

        write_state(self.techniques, self.recipe, checkpoint_dir)

    def load_state(self, checkpoint_dir: str) -> None:
        from .memkit_state import read_state

        folder = os.path.join(checkpoint_dir, STATE_DIR)
        if not os.path.isdir(folder):
            stateful = self.stateful()
            if stateful:
                raise CheckpointError(
                    f"{checkpoint_dir} has no {STATE_DIR}/ but the techniques {', '.join(stateful)} keep state; "
                    "resume from a checkpoint written with this recipe, or start without resume_from_checkpoint"
                )
            logger.warning("hf_memkit: %s carries no memkit state; starting the techniques fresh", checkpoint_dir)
            return
        read_state(self.techniques, checkpoint_dir)

    # finalize -------------------------------------------------------------------------------------------------
    def finalize(self, model: Any, output_dir: str) -> None:
        """The techniques' ``finalize``, then the export. The trained model and the compressed export are two
        outputs: compress techniques run last, beside the trained model (:func:`~hf_memkit.compress.aside.
        compress_aside`), so that afterwards ``model`` holds the trained weights (what ``trainer.save_model()``
        writes to ``output_dir``) and the compressed model is in ``output_dir/<export.dir>``. A post-training
        compress recipe without ``export:`` gets the default one (safetensors in ``export/``): its result would
        be lost otherwise."""
        from ..compress.aside import compress_aside
        from ..export.checkpoint import export_safetensors, export_target

        compressors = [t for t in self.techniques if t.slot == "compress"]
        plan = getattr(compressors[0], "plan", None) if compressors else None
        export = self.recipe.export
        if export is None and plan is not None and plan.stage == "after":
            from ..recipe import ExportConfig

            export = ExportConfig()
        # before any work: export.dir must resolve inside output_dir and not be a folder hf_memkit did not write
        target = export_target(output_dir, export.dir) if export is not None else None
        for t in self.techniques:  # the trained model's own last steps (AST's 2:4 projection, merges) come first
            if t.slot != "compress":
                t.finalize(model, output_dir)
        with compress_aside(model, plan) as work:
            for t in compressors:
                t.finalize(work, output_dir)
            if target is not None:
                export_safetensors(work, target, merge_adapters=export.merge_adapters)
        if compressors:
            logger.info(
                "hf_memkit: compress (%s): the compressed model is in %s; %s (trainer.save_model() writes it to %s)",
                ", ".join(t.name for t in compressors), target or "(no export: add an `export:` section)",
                "the trainer's model keeps its trained weights" if plan is None or plan.stage == "after"
                else "the trained model is the quantized one (e2e_qp)", output_dir)
        elif target is not None:
            logger.info("hf_memkit: export in %s", target)


# ------------------------------------------------------------------------------------------------------------
# TrainingArguments


#: deprecated TrainingArguments names -> their replacement (transformers >= 5)
_RENAMED_ARGS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def apply_training_args(args: Any, overrides: dict[str, Any], *, keep: set[str] = frozenset(), source: str = "") -> Any:
    """A copy of ``args`` with the recipe's ``training_args`` applied, except fields in ``keep`` (those the
    user gave explicitly on the command line win over the recipe)."""
    todo = {k: v for k, v in overrides.items() if k not in keep}
    for k in overrides:
        if k in keep:
            logger.warning("hf_memkit: --%s on the command line overrides training_args.%s of the recipe", k, k)
    if not todo:
        return args
    field_names = {f.name for f in dataclasses.fields(args)}
    for old, new in _RENAMED_ARGS.items():
        # transformers 5 resolves a deprecated alias only when the new name is unset, so a copy that changes
        # just the old name would be silently ignored: set both
        if old in todo and new in field_names and new not in todo:
            todo[new] = todo[old]
    try:
        return dataclasses.replace(args, **todo)
    except (TypeError, ValueError) as exc:
        key = next(iter(todo)) if len(todo) == 1 else ", ".join(todo)
        raise RecipeError(
            f"TrainingArguments rejects the recipe's training_args: {exc}",
            path=source or None,
            key=f"training_args ({key})",
            fix="correct or remove these training_args",
        ) from None


def _trainer_has_optimizer(trainer: Any) -> bool:
    return trainer.optimizer is not None or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None


# ------------------------------------------------------------------------------------------------------------
# attaching to a trainer instance


def attach(trainer: Any, runtime: RecipeRuntime) -> Any:
    """Wire ``runtime`` into an initialised trainer by replacing methods on the instance (reversible with
    :func:`detach`)."""
    from .checkpoints import resolve_resume, save_checkpoint

    if getattr(trainer, "memkit", None) is not None:
        raise RecipeError(
            "this trainer already has a recipe applied",
            fix="apply one recipe per trainer; compose techniques in one recipe instead",
        )
    originals = {n: getattr(trainer, n) for n in ("create_optimizer", "compute_loss", "_save_checkpoint", "train",
                                                  "save_model")}

    def create_optimizer(model=None):
        opt_t = runtime.of_slot("optimizer")
        if trainer.optimizer is None and opt_t is not None:
            trainer.optimizer = opt_t.create_optimizer(model if model is not None else trainer.model, trainer.args)
            # training_args.bin records what really optimizes (the Trainer's `optim` field was not used)
            trainer.args.optim_args = f"hf_memkit: {opt_t.name} ({type(trainer.optimizer).__name__})"
            logger.info("hf_memkit: optimizer %s from technique %r", type(trainer.optimizer).__name__, opt_t.name)
            optimizer = trainer.optimizer
        else:
            optimizer = originals["create_optimizer"](model) if model is not None else originals["create_optimizer"]()
        if not getattr(optimizer, "_memkit_wrapped", False):
            order = [t for t in runtime.techniques if t.slot != "optimizer"] + [
                t for t in runtime.techniques if t.slot == "optimizer"]
            for t in order:
                optimizer = t.wrap_optimizer(optimizer, trainer.model, trainer.args)
            try:
                optimizer._memkit_wrapped = True
            except AttributeError:  # pragma: no cover - optimizers with __slots__
                pass
            trainer.optimizer = optimizer
        for t in runtime.techniques:
            t.optimizer_ready(optimizer, trainer.args, trainer.state)
        if trainer.args.should_log:
            for line in runtime.describe(trainer.model, optimizer):
                logger.info("%s", line)
        return optimizer

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        # callbacks that measure the forward (saved activations) offer a context; callbacks alone never see it
        with contextlib.ExitStack() as stack:
            for cb in trainer.callback_handler.callbacks:
                enter = getattr(cb, "memkit_loss_context", None)
                if enter is not None:
                    stack.enter_context(enter(model))
            result = runtime.compute_loss(originals["compute_loss"], model, inputs, return_outputs,
                                          num_items_in_batch)
        if model.training:  # evaluation losses are not the run's
            for t in runtime.techniques:
                t.observe_loss(result[0] if return_outputs else result, trainer.state.global_step)
        return result

    def _save_checkpoint(model, trial):
        # staged, state added, renamed, then rotated: a checkpoint is complete or absent (see .checkpoints)
        save_checkpoint(trainer, runtime, originals["_save_checkpoint"], model, trial)

    def train(resume_from_checkpoint=None, *args, **kwargs):
        ckpt = resolve_resume(resume_from_checkpoint, trainer.args.output_dir, bool(runtime.stateful()))
        if isinstance(ckpt, str):
            runtime.load_state(ckpt)
        try:
            result = originals["train"](ckpt if isinstance(ckpt, str) else resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            # the run stopped mid-step (the divergence guard, Ctrl-C, an error): callbacks holding something
            # per step (the memory profiler's running profiler) let go of it now, not at interpreter exit
            for cb in trainer.callback_handler.callbacks:
                abort = getattr(cb, "memkit_abort", None)
                if abort is not None:
                    abort()
            raise
        if trainer.args.should_save:
            runtime.finalize(trainer.model, trainer.args.output_dir)
        return result

    def save_model(output_dir=None, _internal_call=False):
        # the model a script saves gets a card that says what happened (checkpoints do not: _internal_call)
        out = originals["save_model"](output_dir, _internal_call)
        if not _internal_call and trainer.args.should_save and runtime.writes_card:
            from .run_card import write_run_card

            write_run_card(trainer, runtime, output_dir or trainer.args.output_dir)
        return out

    for n, fn in (("create_optimizer", create_optimizer), ("compute_loss", compute_loss),
                  ("_save_checkpoint", _save_checkpoint), ("train", train), ("save_model", save_model)):
        setattr(trainer, n, fn)
    for t in runtime.techniques:  # techniques that act on the wrapped model (CO2 turns DDP's gradient sync off)
        bind = getattr(t, "bind_trainer", None)
        if bind is not None:
            bind(trainer)
    callbacks = [cb for t in runtime.techniques for cb in t.callbacks()]
    from .run_card import energy_callback

    energy = energy_callback(runtime)  # HF_MEMKIT_ENERGY=1 (or a country code): codecarbon around train()
    if energy is not None:
        callbacks.append(energy)
    for cb in callbacks:
        trainer.add_callback(cb)
    trainer.memkit = runtime
    trainer._memkit_detach = (originals, callbacks)
    return trainer


def detach(trainer: Any) -> Any:
    """Undo :func:`apply_recipe`: restore the trainer's methods, callbacks and the original model."""
    runtime = getattr(trainer, "memkit", None)
    if runtime is None:
        return trainer
    originals, callbacks = trainer._memkit_detach
    for n in originals:
        if n in vars(trainer):
            delattr(trainer, n)
    for cb in callbacks:
        trainer.remove_callback(cb)
    model = runtime.unpatch()
    trainer.model = trainer.model_wrapped = model
    trainer.memkit = None
    del trainer._memkit_detach
    return trainer


def prepare(model: Any, args: Any, recipe: Recipe, *, trainer_has_optimizer: bool = False,
            keep_args: set[str] = frozenset()) -> tuple[Any, Any, RecipeRuntime]:
    """Before ``Trainer.__init__``: validate, apply training_args, patch the model."""
    runtime = RecipeRuntime(recipe)
    patching = runtime.patching()
    if model is None and patching:
        raise RecipeError(
            f"the techniques {', '.join(patching)} patch the model, but the Trainer was given no model "
            "(model_init builds it later, outside the recipe's reach)",
            path=recipe.source,
            fix="pass model=... to the Trainer instead of model_init",
        )
    overrides = runtime.training_args(model)
    runtime.validate(model, overrides, trainer_has_optimizer)
    if args is not None:
        args = apply_training_args(args, overrides, keep=keep_args, source=recipe.source)
        runtime.check_engine(args)
        if runtime.of_slot("distributed") is not None:
            # accelerate decides "distributed or not" when the device is first asked for; on CPU ranks nothing
            # asks before Trainer.__init__ refuses FSDP as "not distributed", so ask now (GPU runs do the same)
            _ = args.device
    if model is not None:
        model = runtime.patch(model)
    return model, args, runtime


def apply_recipe(trainer: Any, recipe: "Recipe | str | dict") -> Any:
    """Apply a recipe to an existing (already constructed) Trainer — stock, subclass or TRL — in place.

    The model is patched, TrainingArguments overridden by the recipe's ``training_args``, and the optimizer,
    loss, checkpoint and resume paths wired. Returns the trainer. :func:`detach` undoes it.
    """
    recipe = load_recipe(recipe)
    if getattr(trainer, "memkit", None) is not None:
        raise RecipeError(
            "this trainer already has a recipe applied",
            fix="apply one recipe per trainer; compose techniques in one recipe instead",
        )
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise RecipeError(
            "apply_recipe cannot patch a Trainer whose model DeepSpeed/FSDP already wraps",
            path=recipe.source,
            fix="build the Trainer with MemkitTrainer(..., recipe=...) so the recipe applies before wrapping",
        )
    if recipe.slot("distributed"):
        raise RecipeError(
            "apply_recipe cannot add a distributed engine to a Trainer that is already built (the accelerator and "
            "the model wrapping are fixed in Trainer.__init__)",
            path=recipe.source,
            key=f"distributed.{recipe.slot('distributed')[0].name}",
            fix="build the Trainer with MemkitTrainer(..., recipe=...) or launch with `memkit run`",
        )
    runtime = RecipeRuntime(recipe)
    runtime.validate(trainer.model, recipe.training_args, _trainer_has_optimizer(trainer))
    runtime.check_engine(trainer.args)
    new_args = apply_training_args(trainer.args, recipe.training_args, source=recipe.source)
    if new_args is not trainer.args:
        trainer.args = new_args
        # gradient accumulation and mixed precision are baked into the accelerator at init: rebuild it
        trainer.create_accelerator_and_postprocess()
    model = runtime.patch(trainer.model)
    trainer.model = trainer.model_wrapped = model
    return attach(trainer, runtime)
