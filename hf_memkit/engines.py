"""The distributed engines a run can use, and the compatibility check of techniques against them.

Each technique lists the engines it cannot run under in ``Technique.unsupported_engines`` (engine -> reason);
everything else is supported. :func:`recipe_engine` reads the engine a recipe selects (the ``distributed:``
slot, or ``training_args.deepspeed`` / ``training_args.fsdp``), :func:`args_engine` the one a run really uses
(TrainingArguments after the command line, plus the number of ranks), and :func:`check_engine` raises a
RecipeError that says why and which engines do work.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from .errors import RecipeError

#: engine -> label used in messages and in the README table
ENGINES: dict[str, str] = {
    "ddp": "DDP",
    "zero1": "ZeRO-1",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
    "fsdp": "FSDP",
    "co2": "CO2",
}


def zero_engine(stage: Any) -> str:
    """``zero<stage>`` for a DeepSpeed config's ``zero_optimization.stage`` (stage 0 is plain data parallel)."""
    try:
        stage = int(stage)
    except (TypeError, ValueError):
        stage = 0
    return f"zero{stage}" if stage in (1, 2, 3) else "ddp"


def deepspeed_config_engine(config: Any) -> str | None:
    """The engine of a DeepSpeed config (dict or JSON path, relative paths also tried against the repository,
    where ``configs/`` lives); ``zero1`` — what every ZeRO stage does — when the file cannot be read yet."""
    if isinstance(config, str):
        if not os.path.isfile(config):
            from .data.recipes import configs_dir

            alt = configs_dir().parent / config
            if not alt.is_file():
                return "zero1"
            config = str(alt)
        try:
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
    if not isinstance(config, dict):
        return None
    return zero_engine((config.get("zero_optimization") or {}).get("stage", 0))


def recipe_engine(recipe: Any) -> tuple[str | None, str]:
    """(engine, the recipe key that selects it) — engine None: single process, or plain DDP decided by the
    launcher."""
    from . import registry

    for spec in recipe.slot("distributed"):
        cls = registry.get(spec.name, "distributed").technique_cls
        engine = getattr(cls, "engine_of_config", None)
        if engine is not None:
            return engine(spec.config), f"distributed.{spec.name}"
    ta = recipe.training_args
    if ta.get("deepspeed"):
        return deepspeed_config_engine(ta["deepspeed"]), "training_args.deepspeed"
    if ta.get("fsdp"):
        return "fsdp", "training_args.fsdp"
    return None, ""


def args_engine(args: Any, world_size: int | None = None) -> str | None:
    """The engine TrainingArguments ``args`` run under (``ddp`` when several ranks and no other engine)."""
    if args is None:
        return None
    if getattr(args, "deepspeed", None):
        hf = getattr(args, "hf_deepspeed_config", None)
        return deepspeed_config_engine(hf.config if hf is not None else args.deepspeed)
    if getattr(args, "fsdp", None):
        return "fsdp"
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return "ddp" if world_size > 1 else None


def supported(cls: type, engine: str) -> bool:
    return engine not in cls.unsupported_engines


def check_engine(techniques: Iterable[Any], engine: str | None, *, path: str | None = None,
                 extra_engine: str | None = None, source: str = "") -> None:
    """Raise a RecipeError for the first technique (instance, spec-like with ``technique_cls``, or class) that
    does not support ``engine`` (and ``extra_engine``: CO2 runs over DDP ranks, so both apply)."""
    for engine_ in (engine, extra_engine):
        if engine_ is None:
            continue
        if engine_ not in ENGINES:
            raise RecipeError(f"unknown distributed engine {engine_!r}", fix=f"use one of {', '.join(ENGINES)}")
        for t in techniques:
            cls = t if isinstance(t, type) else type(t)
            reason = cls.unsupported_engines.get(engine_)
            if reason is None:
                continue
            works = [label for e, label in ENGINES.items() if e not in cls.unsupported_engines]
            raise RecipeError(
                f"{cls.slot}.{cls.name} does not support {ENGINES[engine_]}"
                + (f" (selected by {source})" if source else "") + f": {reason}",
                path=path,
                key=f"{cls.slot}.{cls.name}",
                fix=f"{cls.name} works with {', '.join(works) or 'a single process only'}; choose one of those "
                f"engines or drop {cls.name}",
            )


def table_rows() -> list[tuple[str, str, dict[str, str]]]:
    """(slot, name, {engine: 'yes' | 'no'}) for every registered technique (the README table)."""
    from . import registry

    rows = []
    for e in registry.entries():
        cls = e.technique_cls
        rows.append((e.slot, e.name, {eng: ("no" if eng in cls.unsupported_engines else "yes") for eng in ENGINES}))
    return rows
