"""How one recipe's compress list becomes a plan: read by role, not by position.

At most one *quantizer* (rtn, gptq, block_ap: declared as conflicts, so two are a recipe error), an optional
*compensator* (lorc) applied per layer right after the quantizer, an optional *trainer* (e2e_qp) and at most one
*pruner*. Without a trainer everything runs after training, in ``finalize`` (on the run's training data when
``calibration`` allows it). With e2e_qp the quantizer runs before training, in ``patch_model`` (on the embedded
corpus: the run's data is not reachable yet), and the Trainer run itself is E2E-QP. Each technique instance reads
the whole list in ``validate``; the *leader* (the quantizer, else lorc, else the pruner) runs the pass and the last
technique of the list writes the report and, for ``export: {format: compressed-tensors}``, the export. Roles and
what may follow what come from the techniques' class attributes (:mod:`.capabilities`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import RecipeError
from .capabilities import COMPENSATOR, PRUNER, QUANTIZER, TRAINER, capability, names_with


@dataclass
class Plan:
    """The compress list of one recipe, by role."""

    names: list[str] = field(default_factory=list)
    quantizer: tuple[str, Any] | None = None
    lorc: Any = None
    e2e: Any = None
    pruners: list = field(default_factory=list)
    export: Any = None
    recipe: Any = None

    @classmethod
    def from_recipe(cls, recipe: Any) -> "Plan":
        plan = cls(recipe=recipe, export=getattr(recipe, "export", None))
        for spec in recipe.slot("compress"):
            plan._add(spec.name, spec.config)
        return plan

    @classmethod
    def alone(cls, technique: "CompressTechnique") -> "Plan":
        plan = cls()
        plan._add(technique.name, technique.config)
        return plan

    def _add(self, name: str, config: Any) -> None:
        self.names.append(name)
        role = capability(name, "role")
        if role == QUANTIZER:
            self.quantizer = (name, config)
        elif role == COMPENSATOR:
            self.lorc = config
        elif role == TRAINER:
            self.e2e = config
        elif role == PRUNER:
            self.pruners.append((name, config))

    @property
    def stage(self) -> str:
        return "before" if self.e2e is not None else "after"

    @property
    def has_quant(self) -> bool:
        return self.quantizer is not None or self.lorc is not None or self.e2e is not None

    @property
    def leader(self) -> str:
        if self.quantizer is not None:
            return self.quantizer[0]
        if self.lorc is None and self.e2e is None and self.pruners:
            return self.pruners[0][0]
        return "lorc" if self.lorc is not None else "e2e_qp"

    def check_order(self) -> None:
        """e2e_qp trains the scales of the model its quantizer (or LoRC) produced, so it comes after them."""
        if self.e2e is None:
            return
        at = self.names.index("e2e_qp")
        later = [n for n in self.names[at + 1:] if capability(n, "role") in (QUANTIZER, COMPENSATOR)]
        if later:
            raise RecipeError(
                f"e2e_qp trains the step sizes of the model {later[0]} quantizes, so {later[0]} must come before it "
                f"in the compress list", path=getattr(self.recipe, "source", None), key=f"compress.{later[0]}",
                fix=f"list {later[0]} before e2e_qp: compress: [{{{later[0]}: ...}}, {{e2e_qp: ...}}]")

    def check_pruners(self) -> None:
        """Pruning runs first, after training; what cannot follow it is refused here."""
        if not self.pruners:
            return
        src = getattr(self.recipe, "source", None)
        if self.e2e is not None:
            raise RecipeError("pruning runs after training and e2e_qp trains a quantized model before it",
                              path=src, key=f"compress.{self.pruners[0][0]}",
                              fix="prune and quantize with rtn/gptq in one recipe, or run e2e_qp on the pruned export")
        semi = [n for n, _ in self.pruners if capability(n, "leaves_nm", False)]
        if semi and self.quantizer is not None and not capability(self.quantizer[0], "keeps_nm", False):
            keepers = [n for n in names_with(QUANTIZER) if capability(n, "keeps_nm", False)]
            raise RecipeError(f"{self.quantizer[0]} updates the weights {semi[0]} pruned, so the result would not "
                              "be 2:4 any more", path=src, key=f"compress.{self.quantizer[0]}",
                              fix=f"use {' or '.join(keepers)} after a 2:4 pruner (pruned zeros stay exact zeros "
                                  "on its grid)")
        if semi and self.lorc is not None:
            raise RecipeError("lorc adds a dense side branch the 2:4 export cannot hold", path=src,
                              key="compress.lorc", fix="drop lorc from a 2:4 recipe")
        if len(self.pruners) > 1:
            raise RecipeError(f"one pruning pass per recipe ({', '.join(n for n, _ in self.pruners)} given)",
                              path=src, key=f"compress.{self.pruners[1][0]}",
                              fix="keep one of them; run the other on the exported folder")

    @property
    def last(self) -> str:
        return self.names[-1] if self.names else ""

    def quantizer_or_default(self) -> tuple[str, Any]:
        if self.quantizer is not None:
            return self.quantizer
        from .passes import config_for

        return "rtn", config_for("rtn")

    def quantizer_calibrated(self) -> bool:
        """Does the quantizer the plan runs (rtn when none is listed) need calibration data?"""
        return bool(capability(self.quantizer_or_default()[0], "calibrated", False))

    @property
    def rebuilds_modules(self) -> bool:
        """Does a pass of the plan rebuild modules (structural pruning), so it must run on a copy?"""
        return any(capability(n, "rebuilds_modules", False) for n, _ in self.pruners)
