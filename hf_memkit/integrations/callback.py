"""``MemkitCallback(recipe)``: the techniques that can work as a plain ``TrainerCallback``, for a stock Trainer.

```python
trainer = Trainer(model=model, args=args, train_dataset=ds,
                  callbacks=[MemkitCallback({"schedule": [{"lisa": {"active_layers": 2}}],
                                             "compress": [{"rtn": {"bits": 4}}]})])
```

What a callback can do, and so what it accepts:

* ``schedule`` (LISA, sparse_update): the model is patched in place in ``on_init_end`` (the Trainer is built, its
  optimizer not yet: the Trainer builds it in ``train()`` over every parameter that requires grad, which is what
  both schedules need), then the techniques' own callbacks switch layers and drop optimizer state through the
  ``model``/``optimizer`` the Trainer hands every callback. A callback added after the Trainer was built
  (``trainer.add_callback``) patches in ``on_train_begin`` instead: LISA still works, sparse_update's channel
  slices would be missing from the optimizer and its own check says so.
* ``compress`` run after training (rtn, gptq, pruners, lorc) and ``export:``: in ``on_train_end``, exactly as
  :meth:`RecipeRuntime.finalize` does for ``MemkitTrainer`` (the compressed copy goes to ``output_dir/export``,
  the trainer's model keeps its trained weights; ``compression_report.json`` beside it).
* ``guard`` (divergence_guard): gradients are checked in ``on_pre_optimizer_step`` as under ``MemkitTrainer``
  (NaN/Inf or vanished gradients stop the run, or skip the step, before the update). The *loss* rules differ: a
  callback never sees a micro-batch loss (``Technique.observe_loss`` is called by the trainer wiring around
  ``compute_loss``), only the mean the Trainer logs every ``logging_steps`` (``on_log``), after that update was
  applied. So the spike rule compares logged means with the median of earlier logged means, ``action: stop``
  stops at that log, ``action: skip`` drops the *next* step; and the Trainer's ``logging_nan_inf_filter`` (on by
  default) hides NaN losses from the log: the gradient check is what catches them.
* reports: ``compression_report.json`` (compress), and with ``memory_report=True`` the measured memory per step
  (parameters, gradients, optimizer state, peak RSS/CUDA) in ``output_dir/memory_report.json``; saved-activation
  bytes stay 0 there, since measuring them needs the loss computation, which a callback cannot wrap.

Refused, by name, with a pointer to ``MemkitTrainer`` / ``apply_recipe``: ``loss``, ``optimizer``, ``adapter``,
``activations`` and ``distributed`` techniques, compress recipes that quantize before training (``e2e_qp``), any
technique using a hook only the trainer wiring calls, and ``training_args`` (the Trainer's arguments are fixed by
the time a callback runs). Technique state is not written into checkpoints (a callback has no say in what a
checkpoint holds): resuming starts LISA's sampler and sparse_update's plan afresh, with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import TrainerCallback

from .. import registry
from ..errors import IncompatibleModelError, RecipeError
from ..recipe import Recipe, load_recipe
from ..technique import Technique
from .trainer import RecipeRuntime

logger = logging.getLogger("hf_memkit")

CALLBACK_SLOTS = ("schedule", "compress", "guard")
_REFUSED = {
    "loss": "a callback cannot replace Trainer.compute_loss",
    "optimizer": "the Trainer builds its optimizer itself; a callback cannot choose it",
    "adapter": "an adapter wraps the model (a PeftModel) before the Trainer prepares it and builds the optimizer",
    "activations": "activation techniques wrap module forwards and must be in place before the Trainer prepares "
                   "the model",
    "distributed": "the distributed engine is fixed when the Trainer builds its accelerator",
}
#: technique hooks that only the trainer wiring calls
_WIRING_HOOKS = ("create_optimizer", "loss", "extra_loss", "training_args", "bind_trainer")
_FIX = ("build the Trainer with hf_memkit.MemkitTrainer(..., recipe=...), or call hf_memkit.apply_recipe(trainer, "
        "recipe) on the Trainer you built; keep MemkitCallback for schedule, compress and guard techniques")
MEMORY_REPORT = "memory_report.json"


def callback_refusals(recipe: Recipe) -> list[str]:
    """``name (slot): why`` for every part of ``recipe`` a callback cannot apply."""
    out = []
    for spec in recipe.techniques:
        cls = registry.get(spec.name, spec.slot).technique_cls
        why = _REFUSED.get(spec.slot)
        if why is None and spec.slot not in CALLBACK_SLOTS:
            why = f"the {spec.slot} slot needs the trainer wiring"
        hooks = [h for h in _WIRING_HOOKS if getattr(cls, h, None) is not getattr(Technique, h, None)]
        if why is None and hooks:
            why = f"it uses {', '.join(hooks)}, which only the trainer wiring calls"
        if why is None and spec.slot == "compress":
            from ..compress.plan import Plan

            if Plan.from_recipe(recipe).stage == "before":
                why = "this compress list quantizes before training and then trains the quantized model"
        if why:
            out.append(f"{spec.name} ({spec.slot}): {why}")
    if recipe.training_args:
        out.append(f"training_args ({', '.join(recipe.training_args)}): the Trainer's arguments are fixed when it "
                   "is built; set them in your TrainingArguments")
    return out


class MemkitCallback(TrainerCallback):
    """Apply a recipe's schedule, compress and guard techniques (and reports) to a stock ``Trainer`` as a
    callback; see the module docstring for what differs from :class:`~hf_memkit.MemkitTrainer`."""

    def __init__(self, recipe: "Recipe | str | dict", *, memory_report: bool = False):
        recipe = load_recipe(recipe)
        refused = callback_refusals(recipe)
        if refused:
            raise RecipeError(f"MemkitCallback cannot apply {'; '.join(refused)}", path=recipe.source, fix=_FIX)
        self.recipe = recipe
        self.runtime = RecipeRuntime(recipe)
        self.callbacks: list[Any] = [cb for t in self.runtime.techniques for cb in t.callbacks()]
        self.profiler = None
        if memory_report:
            from ..memory.profiler import MemoryReportCallback

            self.profiler = MemoryReportCallback()
            self.callbacks.append(self.profiler)
        self._observers = [t for t in self.runtime.techniques if type(t).observe_loss is not Technique.observe_loss]
        self._model: Any = None

    # patching ---------------------------------------------------------------------------------------------------
    def _patch(self, args: Any, model: Any, optimizer: Any) -> None:
        if self._model is not None:
            if model is not None and model is not self._model:
                raise RecipeError("this MemkitCallback is already applied to another Trainer's model",
                                  path=self.recipe.source, fix="give every Trainer its own MemkitCallback(recipe)")
            return
        if model is None:
            raise RecipeError("the Trainer handed the callback no model", path=self.recipe.source,
                              fix="pass model=... to the Trainer (model_init builds it outside the callback's reach)")
        self.runtime.validate(model, {}, trainer_has_optimizer=optimizer is not None)
        self.runtime.check_engine(args)
        patched = self.runtime.patch(model)
        if patched is not model:  # a callback cannot hand the Trainer another model object
            self.runtime.unpatch()
            raise IncompatibleModelError(f"{', '.join(self.recipe.names())}: the patch wraps the model in a new "
                                         f"object, which a callback cannot give the Trainer; {_FIX}")
        self._model = model

    def unpatch(self) -> Any:
        """Undo the patches (LISA's ``requires_grad`` flags, sparse_update's slices folded in); returns the model."""
        model, self._model = self.runtime.unpatch(), None
        return model

    # events -----------------------------------------------------------------------------------------------------
    def _forward(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        for cb in self.callbacks:
            result = getattr(cb, event)(args, state, control, **kwargs)
            if result is not None:
                control = result
        return control

    def on_init_end(self, args, state, control, **kwargs):
        self._patch(args, kwargs.get("model"), kwargs.get("optimizer"))
        return self._forward("on_init_end", args, state, control, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        optimizer = kwargs.get("optimizer")
        self._patch(args, kwargs.get("model"), optimizer)
        stateful = self.runtime.stateful()
        if state.global_step > 0 and stateful:
            logger.warning("hf_memkit: MemkitCallback resumes at step %d without the state of %s (a callback "
                           "cannot store it in checkpoints); use MemkitTrainer for an exact resume",
                           state.global_step, ", ".join(stateful))
        if optimizer is not None:
            for t in self.runtime.techniques:  # the hook MemkitTrainer calls once the optimizer exists
                t.optimizer_ready(optimizer, args, state)
        return self._forward("on_train_begin", args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and self._observers:
            import torch

            for t in self._observers:  # the logged mean, seen after its update (see the module docstring)
                t.observe_loss(torch.tensor(float(loss)), max(state.global_step - 1, 0))
        return self._forward("on_log", args, state, control, logs=logs, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        control = self._forward("on_train_end", args, state, control, **kwargs)
        model = kwargs.get("model")
        if args.should_save and model is not None:
            self.runtime.finalize(model, args.output_dir)
            if self.profiler is not None:
                from ..atomic import write_json

                write_json(os.path.join(args.output_dir, MEMORY_REPORT), {"measured": self.profiler.report()})
        return control


def _forwarder(event: str) -> Any:
    def forward(self: MemkitCallback, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._forward(event, args, state, control, **kwargs)

    forward.__name__ = event
    return forward


# every other event goes to the techniques' own callbacks unchanged (new Trainer events included)
for _event in [n for n in vars(TrainerCallback) if n.startswith("on_") and n not in vars(MemkitCallback)]:
    setattr(MemkitCallback, _event, _forwarder(_event))
