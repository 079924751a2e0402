"""``MemkitTrainer`` and ``MemkitTrainingArguments``: the Trainer subclass way in."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

from transformers import Trainer, TrainingArguments

from .. import registry
from ..recipe import Recipe, load_recipe
from ..recipe_flags import SET, MemkitFlags, apply_flags, settings_help, slot_flag, slot_help
from .trainer import attach, prepare


class _LazyHelp(Mapping):
    """Field metadata whose ``help`` is written when a parser reads it (HfArgumentParser copies the metadata
    into ``add_argument``), so techniques registered after this module is imported (plugins, user code) are
    listed too."""

    def __init__(self, make: Callable[[], str]):
        self._make = make

    def __getitem__(self, key: str) -> str:
        if key != "help":
            raise KeyError(key)
        return self._make()

    def __iter__(self) -> Iterator[str]:
        return iter(("help",))

    def __len__(self) -> int:
        return 1


class _MemkitArguments(TrainingArguments):
    """The methods of :class:`MemkitTrainingArguments` (its fields are generated below, one per registry slot)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if getattr(self, "memkit_recipe", None) is not None or self.memkit_flags():
            self.memkit_resolved_recipe()  # a bad recipe or flag stops the script here, before any model loads

    def memkit_flags(self) -> MemkitFlags:
        """The ``--memkit_<slot>`` and ``--memkit_set`` values given."""
        slots = {s: getattr(self, slot_flag(s)) for s in registry.SLOTS if getattr(self, slot_flag(s), None)}
        return MemkitFlags(slots, list(getattr(self, SET, None) or []))

    def memkit_resolved_recipe(self, recipe: "Recipe | str | dict | None" = None) -> Recipe:
        """``recipe`` (default: ``memkit_recipe``) with the technique flags applied (the flags win)."""
        base = recipe if recipe is not None else getattr(self, "memkit_recipe", None)
        return apply_flags(load_recipe(base) if base is not None else None, self.memkit_flags())


def _fields() -> list[tuple[str, Any, Any]]:
    out: list[tuple[str, Any, Any]] = [("memkit_recipe", Optional[str], dataclasses.field(
        default=None, metadata={"help": "hf_memkit recipe (YAML file or bundled name) applied to the Trainer; "
                                "the --memkit_<slot> and --memkit_set flags change it"}))]
    for slot in registry.SLOTS:
        out.append((slot_flag(slot), Optional[str],
                    dataclasses.field(default=None, metadata=_LazyHelp(lambda s=slot: slot_help(s)))))
    out.append((SET, list[str], dataclasses.field(default_factory=list, metadata=_LazyHelp(settings_help))))
    return out


MemkitTrainingArguments = dataclasses.make_dataclass("MemkitTrainingArguments", _fields(), bases=(_MemkitArguments,))
MemkitTrainingArguments.__module__ = __name__  # pickled into training_args.bin: it must be found here again
MemkitTrainingArguments.__doc__ = """TrainingArguments plus the hf_memkit fields, for scripts that build their own
``HfArgumentParser``: ``memkit_recipe``, one ``memkit_<slot>`` per registry slot (``--memkit_loss cce``,
``--memkit_optimizer 'fira: {rank: 64}'``, ``--memkit_activations mesa,offload``) and ``memkit_set``
(``--memkit_set lisa.active_layers=4``). The flags win over the recipe (see :mod:`hf_memkit.recipe_flags`);
everything is validated when the arguments are built, before any model loads. The dotted form
``--memkit.lisa.active_layers 4`` needs ``parser.parse_args_into_dataclasses(args=hf_memkit.parse_memkit_args())``.
"""


class MemkitTrainer(Trainer):
    """A ``transformers.Trainer`` that applies an hf_memkit recipe.

    ``MemkitTrainer(model=..., args=..., recipe="r.yaml", ...)``; without ``recipe`` it reads
    ``args.memkit_recipe`` (see :class:`MemkitTrainingArguments`); the technique flags of such ``args`` apply on
    top of either. ``keep_args`` names TrainingArguments fields the caller set explicitly (command-line flags):
    the recipe's ``training_args`` do not override those. The model is patched *before* ``Trainer.__init__``, so
    the Trainer's own checks (quantized models need an adapter, ...) see the result.
    """

    def __init__(self, model: Any = None, args: TrainingArguments | None = None, *posargs: Any,
                 recipe: "Recipe | str | dict | None" = None, keep_args: "set[str] | frozenset[str]" = frozenset(),
                 **kwargs: Any):
        resolve = getattr(args, "memkit_resolved_recipe", None)
        if resolve is not None:
            recipe = resolve(recipe)
        else:
            recipe = load_recipe(recipe if recipe is not None else {})
        has_opt = kwargs.get("optimizers", (None, None))[0] is not None or (
            kwargs.get("optimizer_cls_and_kwargs") is not None
        )
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        model, args, runtime = prepare(model, args, recipe, trainer_has_optimizer=has_opt, keep_args=keep_args)
        super().__init__(model, args, *posargs, **kwargs)
        attach(self, runtime)
