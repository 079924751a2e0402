"""What an optimizer technique does when its config says ``gradient_release: true``: the checks (recipe, then the
run's real TrainingArguments), the wrapper, the Trainer's gradient norm, the start-of-training line and the
memory estimate. :class:`hf_memkit.optimizer_slot.technique.OptimizerTechnique` calls these; see the package docstring."""

from __future__ import annotations

import logging
from typing import Any

from ...errors import RecipeError

logger = logging.getLogger("hf_memkit")

_NO_CLIP = "set `--max_grad_norm 0` (training_args: {max_grad_norm: 0}) or `release_clipping: per_parameter`"


def _key(technique: Any, field: str = "gradient_release") -> str:
    return f"optimizer.{technique.name}.{field}"


def validate_release(technique: Any, ctx: Any) -> None:
    """What the recipe alone shows: an optimizer whose math is not per parameter, an engine, fp16, a clipping
    norm with ``release_clipping: refuse``, the divergence guard's ``action: skip``."""
    from ...engines import ENGINES, recipe_engine

    path = getattr(ctx.recipe, "source", None)
    if technique.release_refusal:
        raise RecipeError(f"{technique.name} cannot release gradients: {technique.release_refusal}", path=path,
                          key=_key(technique),
                          fix="set `gradient_release: false`, or use adamw, adamw_8bit, cosmos or fira")
    engine, source = recipe_engine(ctx.recipe) if hasattr(ctx.recipe, "slot") else (None, "")
    if engine is not None:
        raise _engine_error(technique, ENGINES.get(engine, engine) + f" (selected by {source})", path)
    check_training_args(technique, ctx.training_args, path, explicit_only=True)
    for spec in ctx.recipe.slot("guard") if hasattr(ctx.recipe, "slot") else []:
        if spec.name != "divergence_guard":
            continue
        technique._release_guard_checks_gradients = bool(getattr(spec.config, "check_gradients", False))
        if getattr(spec.config, "action", None) == "skip":
            raise RecipeError(
                "the divergence guard's `action: skip` drops a bad step's gradients before the update, but with "
                "gradient release every parameter is updated inside backward, before the guard looks",
                path=path, key=_key(technique), fix="use the guard's `action: stop`, or `gradient_release: false`")


def _engine_error(technique: Any, engine: str, path: str | None) -> RecipeError:
    return RecipeError(
        f"gradient release does not work under {engine}: the hooks step each parameter as soon as its local "
        "gradient is complete, before the gradient all-reduce (and ZeRO/FSDP hand the optimizer shards)",
        path=path, key=_key(technique), fix="train on one process, or set `gradient_release: false`")


def check_training_args(technique: Any, args: Any, path: str | None = None, *, explicit_only: bool = False) -> None:
    """fp16 and the clipping rule against TrainingArguments (a dataclass, or the recipe's dict of overrides:
    ``explicit_only`` skips what the dict does not set, such as the Trainer's default max_grad_norm 1.0)."""
    get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    if get("fp16", False):
        raise RecipeError(
            "gradient release cannot run with fp16 mixed precision: the GradScaler unscales and checks every "
            "gradient for inf before any step, and here each parameter steps inside backward",
            path=path, key=_key(technique), fix="use bf16 (or fp32), or set `gradient_release: false`")
    norm = get("max_grad_norm", None if explicit_only else 1.0)
    if technique.config.release_clipping == "refuse" and norm is not None and norm > 0:
        raise RecipeError(
            f"max_grad_norm is {norm}, and with gradient release the gradients are freed before a global norm "
            "exists, so the Trainer cannot clip by it (`release_clipping: refuse`)",
            path=path, key=_key(technique, "release_clipping"), fix=_NO_CLIP)


def bind_release(technique: Any, trainer: Any) -> None:
    """At attach: check the run's real arguments and engine, and make the Trainer's gradient norm (what it
    clips and logs) come from the hooks: the gradients it would read are already freed."""
    from ...engines import ENGINES, args_engine

    check_training_args(technique, trainer.args)
    engine = args_engine(trainer.args)
    if engine is not None:
        raise _engine_error(technique, ENGINES.get(engine, engine), None)
    missing = [n for n in ("_clip_grad_norm", "_get_grad_norm") if not callable(getattr(trainer, n, None))]
    if missing:
        raise RecipeError(
            f"this Trainer has no {', '.join(missing)} (transformers 5.x has), through which gradient release "
            "reports the real gradient norm instead of the 0 of freed gradients",
            key=_key(technique), fix="use transformers 5.x, or set `gradient_release: false`")
    technique._release_trainer = trainer
    clip, get = trainer._clip_grad_norm, trainer._get_grad_norm

    def released() -> Any:
        from .optimizer import find_release

        return find_release(trainer.optimizer)

    def _clip_grad_norm(model: Any) -> Any:
        wrapper = released()  # clipping itself happened per parameter in the hooks
        return clip(model) if wrapper is None else wrapper.grad_norm()

    def _get_grad_norm(model: Any, grad_norm: Any = None) -> Any:
        wrapper = released()
        if wrapper is None:
            return get(model, grad_norm=grad_norm)
        return grad_norm if grad_norm is not None else wrapper.grad_norm()

    trainer._clip_grad_norm, trainer._get_grad_norm = _clip_grad_norm, _get_grad_norm


def wrap_release(technique: Any, optimizer: Any, args: Any) -> Any:
    """The run's optimizer wrapped in a :class:`GradientRelease` (once: a second ``train()`` keeps it)."""
    from .optimizer import GradientRelease, find_release

    if find_release(optimizer) is not None:
        return optimizer
    check_training_args(technique, args)
    trainer = getattr(technique, "_release_trainer", None)
    accumulation = getattr(args, "gradient_accumulation_steps", 1)
    if trainer is None and accumulation > 1:
        raise RecipeError(
            f"gradient_accumulation_steps is {accumulation} and no Trainer is bound, so the hooks cannot tell the "
            "last micro-batch (which steps) from the others (which keep their gradients)",
            key=_key(technique), fix="build the Trainer with MemkitTrainer or apply_recipe, or use "
            "gradient_accumulation_steps 1")
    norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    if norm > 0:
        logger.warning("hf_memkit: gradient release clips each parameter's gradient to norm %s on its own "
                       "(per-parameter clipping, not the Trainer's global clipping); grad_norm in the logs is "
                       "the global norm before clipping", norm)
    if getattr(technique, "_release_guard_checks_gradients", False):
        logger.warning("hf_memkit: gradient release frees gradients inside backward, so the divergence guard's "
                       "gradient checks see none; its loss checks still run and grad_norm is logged")
    accumulating = None
    if trainer is not None:
        accumulating = lambda: not trainer.accelerator.gradient_state.sync_gradients  # noqa: E731
    return GradientRelease(optimizer, max_grad_norm=norm, accumulating=accumulating)


def describe_release(optimizer: Any) -> str:
    from .optimizer import find_release

    wrapper = find_release(optimizer)
    if wrapper is None:
        return "; gradient release on (the optimizer is built when training starts)"
    clipping = (f"each gradient clipped to norm {wrapper.max_grad_norm:g} on its own" if wrapper.max_grad_norm > 0
                else "no clipping")
    return f"; gradient release on: each parameter steps inside backward, {clipping}"


def estimate_release(technique: Any, mem: Any) -> None:
    """Gradients alive at once: the largest trainable tensor's instead of all of them. The estimator applies it
    after it has counted every gradient (``MemoryEstimate.gradient_release``), in each gradient's own dtype (a
    16-bit weight of the precision slot has a 16-bit gradient). It assumes ``gradient_accumulation_steps`` 1,
    which the estimator does not see (with accumulation all gradients stay)."""
    mem.gradient_release = technique.name
