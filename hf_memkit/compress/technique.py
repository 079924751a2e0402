"""The base class of the ``compress:`` techniques and its lifecycle: checks at recipe load, the pass before
training (a quantizer followed by e2e_qp), calibration data from the run, and ``finalize`` (prune, quantize,
report, export). What runs when is the plan's (:mod:`.plan`); what each technique can do is its class
attributes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import IncompatibleModelError, RecipeError
from ..technique import PatchHandle, Technique, ValidationContext
from .capabilities import QUANTIZER, capability
from .plan import Plan

logger = logging.getLogger("hf_memkit")

REPORT_FILE = "compression_report.json"

ADAPTER_CONFLICT = (
    "quantization runs on the plain base model; with an adapter, train and merge it first "
    "(export: {format: safetensors, merge_adapters: true}), then run `memkit compress` on the merged folder"
)


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
    #: capabilities, read by the plan and the passes (never a table of names)
    #: quantizer | compensator | trainer | pruner (see :mod:`.plan`)
    role: ClassVar[str] = QUANTIZER
    #: the pass needs calibration data (activations of real text)
    calibrated: ClassVar[bool] = False
    #: a quantizer that keeps exact zeros exact (so it may follow a 2:4 pruner)
    keeps_nm: ClassVar[bool] = False
    #: a pruner that leaves N:M (2:4) weights
    leaves_nm: ClassVar[bool] = False
    #: a pass that rebuilds modules and edits the config (structural pruning): it runs on a copy of the model
    rebuilds_modules: ClassVar[bool] = False
    #: before training, the pass trains every weight of the decoder blocks (norms included), not only the Linears
    trains_blocks: ClassVar[bool] = False

    @classmethod
    def run_pass(cls, model: Any, config: Any, *, calibration: Any = None, lorc: Any = None,
                 key: str | None = None) -> Any:
        """Run this technique's pass on ``model`` in place and return its report (see :mod:`.passes`)."""
        raise IncompatibleModelError(f"compress.{cls.name} has no pass of its own to run on a model; it joins a "
                                     "quantizer's pass in a recipe")

    @classmethod
    def check_targets(cls, model: Any, config: Any, key: str) -> dict[str, Any]:
        """The Linears the pass would change, checked before any weight moves; raises IncompatibleModelError."""
        return {}

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
        from .passes import check_pass

        key = f"compress.{qname}" if self.plan.quantizer is not None or qname == self.name else (
            f"compress.{self.name} (which starts from rtn's default grid; list a quantizer before it to choose one)")
        targets = check_pass(qname, meta, qcfg, key)
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
        if not plan.quantizer_calibrated():
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
        from .passes import check_pass, run_pass

        targets = check_pass(self.name, model, self.config, self.key)
        calib = self.calibration_data(model, self.config, self.key) if self.calibrated else None
        touched = set(targets)
        if self.trains_blocks:  # every weight of the blocks changes, norms included
            from ..integrations.anatomy import find_decoder_layers

            prefix = find_decoder_layers(model, key=self.key).path
            touched |= {n for n, _ in model.named_modules() if n.startswith(prefix + ".")}
        saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                 if n.rpartition(".")[0] in touched}
        self.report = run_pass(self.name, model, self.config, calibration=calib, key=self.key)
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
            from .passes import PassReport, run_pass

            prune_reports = {}
            for pname, pcfg in plan.pruners:
                pkey = f"compress.{pname}"
                pcal = self.calibration_data(model, pcfg, pkey) if capability(pname, "calibrated", False) else None
                prune_reports[pname] = run_pass(pname, model, pcfg, calibration=pcal, key=pkey)
            if plan.has_quant:
                qname, qcfg = plan.quantizer_or_default()
                key = f"compress.{qname}"
                calib = self.calibration_data(model, qcfg, key) if plan.quantizer_calibrated() else None
                self.report = run_pass(qname, model, qcfg, lorc=plan.lorc, calibration=calib, key=key)
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
