"""``MemkitTrainer`` and ``MemkitTrainingArguments``: the Trainer subclass way in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import Trainer, TrainingArguments

from ..recipe import Recipe, load_recipe
from .trainer import attach, prepare


@dataclass
class MemkitTrainingArguments(TrainingArguments):
    """TrainingArguments plus ``memkit_recipe``, for scripts that build their own ``HfArgumentParser``."""

    memkit_recipe: str | None = field(
        default=None, metadata={"help": "hf_memkit recipe (YAML file or bundled name) applied to the Trainer"}
    )


class MemkitTrainer(Trainer):
    """A ``transformers.Trainer`` that applies an hf_memkit recipe.

    ``MemkitTrainer(model=..., args=..., recipe="r.yaml", ...)``; without ``recipe`` it reads
    ``args.memkit_recipe`` (see :class:`MemkitTrainingArguments`). ``keep_args`` names TrainingArguments fields
    the caller set explicitly (command-line flags): the recipe's ``training_args`` do not override those. The model is patched *before*
    ``Trainer.__init__``, so the Trainer's own checks (quantized models need an adapter, ...) see the result.
    """

    def __init__(self, model: Any = None, args: TrainingArguments | None = None, *posargs: Any,
                 recipe: "Recipe | str | dict | None" = None, keep_args: "set[str] | frozenset[str]" = frozenset(),
                 **kwargs: Any):
        if recipe is None:
            recipe = getattr(args, "memkit_recipe", None)
        recipe = load_recipe(recipe if recipe is not None else {})
        has_opt = kwargs.get("optimizers", (None, None))[0] is not None or (
            kwargs.get("optimizer_cls_and_kwargs") is not None
        )
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        model, args, runtime = prepare(model, args, recipe, trainer_has_optimizer=has_opt, keep_args=keep_args)
        super().__init__(model, args, *posargs, **kwargs)
        attach(self, runtime)
