"""What the ``compress:`` techniques share: how one recipe's compress list becomes a plan, when it runs, where
its calibration data comes from, and what ``finalize`` writes.

A compress list is read by role, not by position: at most one *quantizer* (rtn, gptq, block_ap: declared as
conflicts, so two are a recipe error), an optional *compensator* (lorc) applied per layer right after the
quantizer, and an optional *trainer* (e2e_qp). Without a trainer everything runs after training, in
``finalize`` (on the run's training data when ``calibration`` allows it). With e2e_qp the quantizer runs
before training, in ``patch_model`` (on the embedded corpus: the run's data is not reachable yet), and the
Trainer run itself is E2E-QP. Each technique instance reads the whole list in ``validate``; the *leader*
(the quantizer, else lorc) runs the pass and the last technique of the list writes the report and, for
``export: {format: compressed-tensors}``, the export.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import IncompatibleModelError, RecipeError
from ..technique import PatchHandle, Technique, ValidationContext

logger = logging.getLogger("hf_memkit")

QUANTIZER, COMPENSATOR, TRAINER, PRUNER = "quantizer", "compensator", "trainer", "pruner"
ROLES = {"rtn": QUANTIZER, "gptq": QUANTIZER, "block_ap": QUANTIZER, "lorc": COMPENSATOR, "e2e_qp": TRAINER,
         "magnitude_24": PRUNER, "wanda_24": PRUNER, "comp": PRUNER, "l1_structured": PRUNER}
#: pruners that leave 2:4 weights: a quantizer after them must keep exact zeros (rtn does; gptq/block_ap update
#: the pruned weights)
SEMI_STRUCTURED = ("magnitude_24", "wanda_24")
REPORT_FILE = "compression_report.json"

ADAPTER_CONFLICT = (
    "quantization runs on the plain base model; with an adapter, train and merge it first "
    "(export: {format: safetensors, merge_adapters: true}), then run `memkit compress` on the merged folder"
)


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
        role = ROLES.get(name)
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
        later = [n for n in self.names[at + 1:] if ROLES.get(n) in (QUANTIZER, COMPENSATOR)]
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
        semi = [n for n, _ in self.pruners if n in SEMI_STRUCTURED]
        if semi and self.quantizer is not None and self.quantizer[0] != "rtn":
            raise RecipeError(f"{self.quantizer[0]} updates the weights {semi[0]} pruned, so the result would not "
                              "be 2:4 any more", path=src, key=f"compress.{self.quantizer[0]}",
                              fix="use rtn after a 2:4 pruner (pruned zeros stay exact zeros on its grid)")
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
        from .pipeline import default_config

        return "rtn", default_config("rtn")


@dataclass
class RunData:
    """What the Trainer offers at ``on_train_begin``: the training dataloader and the tokenizer."""

    dataloader: Any = None
    tokenizer: Any = None


def dataset_batches(dataloader: Any, num_samples: int):
    """Batches of the first ``num_samples`` rows of the dataloader's dataset, collated as the Trainer does.

    Reading rows by index (not iterating the dataloader) consumes no random state and gives the same rows in an
    interrupted-and-resumed run as in an uninterrupted one."""
    from .calibration import CALIBRATION_BATCH

    ds = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    if ds is None or collate is None:
        yield from dataloader
        return
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        rows = [ds[i] for i in range(min(num_samples, len(ds)))]
    else:
        rows = []
        for row in ds:
            rows.append(row)
            if len(rows) >= num_samples:
                break
    for i in range(0, len(rows), CALIBRATION_BATCH):
        yield collate(rows[i:i + CALIBRATION_BATCH])


_ENGINE_REASON = (
    "runs on whole weights after training; under ZeRO-3/FSDP each rank holds only shards. Train without it, "
    "then run `memkit compress` on the saved model"
)


class CompressTechnique(Technique):
    """Base of the ``compress`` slot techniques (not registered itself: it has no name)."""

    slot: ClassVar[str] = "compress"
    #: before training (a quantizer followed by e2e_qp) the pass rewrites the Linears; it goes before forward patches
    replaces_modules: ClassVar[bool] = True
    unsupported_engines: ClassVar[dict[str, str]] = {e: _ENGINE_REASON for e in ("zero3", "fsdp")}
    role: ClassVar[str] = QUANTIZER
    calibrated: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._plan: Plan | None = None
        self.run = RunData()
        self.report: Any = None

    @property
    def plan(self) -> Plan:
        return self._plan if self._plan is not None else Plan.alone(self)

    @property
    def key(self) -> str:
        return f"compress.{self.name}"

    # 1 ----------------------------------------------------------------------------------------------------------
    def check_recipe(self, recipe: Any) -> None:
        """The compress list's order and combinations are the recipe's own: refused when it loads."""
        CompressTechnique.validate(self, ValidationContext(recipe=recipe))
        self._plan = None

    def validate(self, ctx: ValidationContext) -> None:
        recipe = ctx.recipe
        self._plan = Plan.from_recipe(recipe) if recipe is not None and recipe.slot("compress") else None
        plan = self.plan
        if self.name != plan.leader:
            return
        plan.check_order()
        plan.check_pruners()
        if not plan.has_quant:
            return
        qname, qcfg = plan.quantizer_or_default()
        if plan.stage == "before" and getattr(qcfg, "calibration", None) == "train":
            raise RecipeError(
                f"{qname} runs before training here (e2e_qp follows it), when the run's training data is not "
                "available yet, so calibration: train cannot work",
                path=getattr(recipe, "source", None), key=f"compress.{qname}.calibration",
                fix="use calibration: corpus (or auto, which means the embedded corpus before training)",
            )
        if ctx.model_config is not None:
            self._check_model_config(ctx.model_config, qname, qcfg)

    def _check_model_config(self, model_config: Any, qname: str, qcfg: Any) -> None:
        """Catch a missing Linear or a group size that does not divide a width before any training or
        calibration work, on a weightless (meta-device) copy of the model."""
        try:
            from ..memory.estimate import meta_model

            meta = meta_model(model_config)
        except Exception:  # an architecture the Auto classes cannot build: the pass checks the real model
            return
        from .pipeline import check_model

        key = f"compress.{qname}" if self.plan.quantizer is not None or qname == self.name else (
            f"compress.{self.name} (which starts from rtn's default grid; list a quantizer before it to choose one)")
        targets = check_model(meta, qname, qcfg, key)
        export = self.plan.export
        if export is not None and export.format == "compressed-tensors":
            from ..export.compressed_tensors import check_loadable

            check_loadable({qcfg.spec().for_width(m.in_features) for m in targets.values()}, key)

    # 2 ----------------------------------------------------------------------------------------------------------
    def estimate(self, mem: Any) -> None:
        """Post-training passes leave training memory as it is; the grid is recorded for e2e_qp's estimate."""
        if self.role == QUANTIZER:
            mem.quant_grid = (self.config.spec(), list(self.config.skip_modules))

    # 6 ----------------------------------------------------------------------------------------------------------
    def callbacks(self) -> list:
        from transformers import TrainerCallback

        technique = self

        class CompressRunDataCallback(TrainerCallback):
            """Keeps the training dataloader and tokenizer for the calibration in ``finalize``, and fails at
            the start of training (not after it) when there will be nothing to calibrate on."""

            def on_train_begin(self, args, state, control, train_dataloader=None, processing_class=None, **kw):
                technique.run = RunData(train_dataloader, processing_class)
                technique._check_calibration_source(kw.get("model"))

        return [CompressRunDataCallback()]

    def _check_calibration_source(self, model: Any) -> None:
        plan = self.plan
        if self.name != plan.leader or plan.stage != "after":
            return
        qname, qcfg = plan.quantizer_or_default()
        if qname not in ("gptq", "block_ap"):
            return
        if qcfg.calibration in ("auto", "train") and self.run.dataloader is not None:
            return
        if self.run.tokenizer is None and (model is None or _tokenizer_for(model) is None):
            raise IncompatibleModelError(
                f"compress.{qname}: calibration: {qcfg.calibration} needs a tokenizer for the embedded corpus, and "
                "the Trainer has no processing_class and none is saved beside the model; pass "
                "processing_class=tokenizer, or use calibration: auto to calibrate on the training data"
            )

    def calibration_data(self, model: Any, qcfg: Any, key: str):
        from .calibration import resolve

        batches = None
        if self.run.dataloader is not None and qcfg.calibration in ("auto", "train"):
            batches = dataset_batches(self.run.dataloader, qcfg.num_samples)
        return resolve(qcfg.calibration, key=key, num_samples=qcfg.num_samples, seq_len=qcfg.seq_len,
                       batches=batches, tokenizer=self.run.tokenizer, model=model)

    # 3 (quantizers before training) ------------------------------------------------------------------------------
    def patch_model(self, model: Any) -> PatchHandle | None:
        plan = self.plan
        if self.role != QUANTIZER or plan.stage != "before" or self.name != plan.leader:
            return None
        import torch

        from .linear import clear_quantized_
        from .pipeline import check_model, quantize_model_

        targets = check_model(model, self.name, self.config, self.key)
        calib = self.calibration_data(model, self.config, self.key) if self.calibrated else None
        touched = set(targets)
        if self.name == "block_ap":  # trains every weight of the blocks, norms included
            from .layerwise import find_blocks

            prefix, _ = find_blocks(model, self.key)
            touched |= {n for n, _ in model.named_modules() if n.startswith(prefix + ".")}
        saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                 if n.rpartition(".")[0] in touched}
        self.report = quantize_model_(model, self.name, self.config, calibration=calib, key=self.key)
        model._memkit_compress_report = self.report

        def undo():
            for m in targets.values():
                clear_quantized_(m)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in saved:
                        p.copy_(saved[n].to(p.device, p.dtype))
            return model

        return PatchHandle(model, undo)

    # 8 ----------------------------------------------------------------------------------------------------------
    def finalize(self, model: Any, output_dir: str) -> None:
        plan = self.plan
        if plan.stage == "after" and self.name == plan.leader:
            from .pipeline import PassReport, quantize_model_

            prune_reports = {}
            for pname, pcfg in plan.pruners:
                from ..prune.pipeline import CALIBRATED, prune_model_

                pkey = f"compress.{pname}"
                pcal = self.calibration_data(model, pcfg, pkey) if pname in CALIBRATED else None
                prune_reports[pname] = prune_model_(model, pname, pcfg, calibration=pcal, key=pkey)
            if plan.has_quant:
                qname, qcfg = plan.quantizer_or_default()
                key = f"compress.{qname}"
                calib = self.calibration_data(model, qcfg, key) if qname in ("gptq", "block_ap") else None
                self.report = quantize_model_(model, qname, qcfg, lorc=plan.lorc, calibration=calib, key=key)
            else:
                self.report = PassReport("none", {})
            self.report.layers.update({f"prune:{k}": v for k, v in prune_reports.items()})
            model._memkit_compress_report = self.report
        if self.name != plan.last:
            return
        report = getattr(model, "_memkit_compress_report", None) or self.report
        from ..atomic import write_json

        write_json(os.path.join(output_dir, REPORT_FILE), {"techniques": plan.names, "stage": plan.stage,
                                                          "pass": report.to_dict() if report is not None else None})
        export = plan.export
        if export is not None and export.format == "compressed-tensors":
            # RecipeRuntime.finalize only knows export_safetensors; this goes once it calls export_model. The
            # runtime hands a model whose trained weights come back afterwards (quant.pipeline.compress_aside).
            from ..export.checkpoint import export_model, export_target

            export_model(model, export_target(output_dir, export.dir), export, recipe=plan.recipe,
                         tokenizer=self.run.tokenizer or _tokenizer_for(model))


def _tokenizer_for(model: Any) -> Any:
    from .calibration import tokenizer_for

    return tokenizer_for(model)
