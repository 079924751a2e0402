"""The search space of ``memkit plan``: recipes built from the registered techniques, each with the features that
decide its quality prior.

A candidate is one choice per *axis*:

* ``mode``       — what trains: ``full`` (every weight), ``lora`` (``adapter: lora`` r16, alpha 32, every Linear) or
                   ``qlora`` (``adapter: qlora``: the same adapter over an nf4 base);
* ``precision``  — how the weights are stored: ``fp32``, or ``precision: bf16`` with stochastic-rounding updates
                   (``bf16_sr``) or round-to-nearest updates (``bf16_rn``; kept so the table shows the lost-update
                   failure). With an adapter the base is frozen, so the update rule is moot: ``bf16`` alone;
* ``optimizer``  — ``adamw`` (torch) or ``adamw_8bit`` (bitsandbytes);
* toggles        — ``cce`` (``loss: cce``: the loss and gradients of the plain cross-entropy) and ``gc`` (gradient
                   checkpointing: recomputes the same forward) are exact: they change memory and time, not the
                   result (each has an equality test). ``release`` (the optimizer's ``gradient_release``) equals
                   the plain step to 1e-6 only without gradient clipping; under ``max_grad_norm`` (the Trainer's
                   default) it clips per parameter, so it is measured on its own (see :mod:`.priors`).

``(mode, precision, optimizer)`` is the candidate's *family*: its expected quality is the measured perplexity of
that family with the same ``release`` choice (:mod:`.priors`); ``cce`` and ``gc`` keep it. Every combination is offered to the recipe loader
(:func:`hf_memkit.recipe.load_recipe`: schema and declared conflicts) and to each technique's ``validate`` on the
model's config; what either refuses is never proposed (the plan counts it, with the first reason).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
QLORA = {**LORA, "quant_type": "nf4", "double_quant": True}
MODES = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16_sr", "bf16_rn", "bf16")
OPTIMIZERS = ("adamw", "adamw_8bit")
TOGGLES = ("release", "cce", "gc")


@dataclass(frozen=True)
class Candidate:
    """One recipe of the search space."""

    mode: str
    precision: str
    optimizer: str
    toggles: frozenset = field(default_factory=frozenset)
    micro_batch: int = 0  # per-device batch; 0 = the workload's batch (no accumulation)
    accumulation: int = 1

    @property
    def family(self) -> tuple[str, str, str]:
        return (self.mode, self.precision, self.optimizer)

    @property
    def label(self) -> str:
        parts = [self.mode, self.precision, self.optimizer, *[t for t in TOGGLES if t in self.toggles]]
        if self.accumulation > 1:
            parts.append(f"{self.micro_batch}x{self.accumulation}acc")
        return " ".join(parts)

    def recipe(self) -> dict[str, Any]:
        """The recipe as a mapping (``memkit: 1`` included)."""
        out: dict[str, Any] = {"memkit": 1, "description": f"memkit plan: {self.label}"}
        opt: dict[str, Any] = {}
        if "release" in self.toggles:
            opt["gradient_release"] = True
        out["optimizer"] = {self.optimizer: opt}
        if self.mode == "lora":
            out["adapter"] = {"lora": dict(LORA)}
        elif self.mode == "qlora":
            out["adapter"] = {"qlora": dict(QLORA)}
        if self.precision == "bf16":
            out["precision"] = {"bf16": {}}
        elif self.precision == "bf16_sr":
            out["precision"] = {"bf16": {"update": "stochastic"}}
        elif self.precision == "bf16_rn":
            out["precision"] = {"bf16": {"update": "nearest"}}
        if "cce" in self.toggles:
            out["loss"] = {"cce": {}}
        args: dict[str, Any] = {}
        if "gc" in self.toggles:
            args["gradient_checkpointing"] = True
        if self.accumulation > 1:
            args["gradient_accumulation_steps"] = self.accumulation
        if args:
            out["training_args"] = args
        return out


def enumerate_candidates(*, full_finetune: bool = False, adapter_ok: bool = True,
                         micro_batches: Iterable[tuple[int, int]] = ((0, 1),)) -> list[Candidate]:
    """Every combination of the axes (before the loader's verdict). ``full_finetune`` keeps ``mode: full``
    only; ``adapter_ok=False`` as well. ``micro_batches``: (per-device batch, accumulation) pairs to try."""
    modes = ("full",) if full_finetune or not adapter_ok else MODES
    out = []
    for mode in modes:
        precisions = ("fp32", "bf16_sr", "bf16_rn") if mode == "full" else ("fp32", "bf16")
        for precision, optimizer in itertools.product(precisions, OPTIMIZERS):
            for bits in itertools.product((False, True), repeat=len(TOGGLES)):
                toggles = frozenset(t for t, on in zip(TOGGLES, bits) if on)
                for micro, acc in micro_batches:
                    if acc > 1 and "release" in toggles:
                        continue  # release keeps every gradient between micro-batches: no saving, never offered
                    out.append(Candidate(mode, precision, optimizer, toggles, micro, acc))
    return out


def admissible(candidate: Candidate, config: Any) -> str | None:
    """``None`` when the recipe loader and every technique's ``validate`` (on ``config``) accept the candidate,
    else the first refusal's message."""
    from types import SimpleNamespace

    from ..errors import RecipeError
    from ..recipe import load_recipe

    try:
        recipe = load_recipe(candidate.recipe())
        from ..integrations.trainer import RecipeRuntime

        runtime = RecipeRuntime(recipe)
        model = SimpleNamespace(config=config)
        runtime.validate(model, runtime.training_args(None))
    except RecipeError as exc:
        return exc.problem
    return None
