"""``memkit compress MODEL --recipe r.yaml -o DIR``: run a recipe's ``compress:`` list without a training run
and write the export (the recipe's ``export:``, compressed-tensors when it has none) into ``DIR``.

Calibration text is the embedded corpus (train split); perplexity before and after is measured on its eval
split. A recipe with ``e2e_qp`` does train: E2E-QP *is* a training run (of the scales only), done here on the
embedded corpus with the recipe's ``training_args`` (defaults: 50 steps, batch 4 x 256 tokens, the paper's
learning rate for the bit width).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

from ..atomic import pause_point
from ..errors import RecipeError
from ..export.checkpoint import OutputDirError
from ..compress.plan import Plan
from ..compress.technique import REPORT_FILE

E2E_DEFAULTS = {"max_steps": 50, "per_device_train_batch_size": 4, "lr_scheduler_type": "cosine",
                "warmup_steps": 0.03, "max_grad_norm": 0.3, "logging_steps": 10, "save_strategy": "no",
                "report_to": [], "seed": 0, "dataloader_pin_memory": False}
E2E_SEQ_LEN = 256


def check_recipe(recipe: Any) -> Plan:
    """Static checks for a compress-only run (no model is touched)."""
    if not recipe.slot("compress"):
        raise RecipeError("the recipe has no `compress:` techniques, so there is nothing to compress",
                          path=recipe.source, key="compress",
                          fix="add e.g. `compress: [{gptq: {bits: 4, group_size: 128}}]`")
    plan = Plan.from_recipe(recipe)
    plan.check_pruners()
    if plan.quantizer is not None and plan.e2e is None:
        name, cfg = plan.quantizer
        if getattr(cfg, "calibration", None) == "train":
            raise RecipeError(
                "calibration: train needs a training run's data; `memkit compress` has none",
                path=recipe.source, key=f"compress.{name}.calibration",
                fix="use calibration: auto or corpus (the embedded corpus)",
            )
    return plan


def compress(model: str, recipe: Any, output_dir: str, *, evaluate: bool = True, overwrite: bool = False,
             log=print, country: str = "USA") -> dict[str, Any]:
    """Compress ``model`` and write the export into ``output_dir``, staged and renamed into place at the end (an
    interrupted run leaves the previous folder or nothing). A non-empty ``output_dir`` is refused before any
    model loads unless ``overwrite``, which replaces it whole (never merges)."""
    from ..recipe import load_recipe

    recipe = load_recipe(recipe)
    plan = check_recipe(recipe)  # a bad recipe stops here, before any model loads
    from ..data.models import resolve_model_path
    from ..export.checkpoint import check_output_dir

    path = resolve_model_path(model)
    _check_not_source(path, output_dir, overwrite)
    check_output_dir(output_dir, overwrite=overwrite, replace_own=False)

    from ..data.models import load_model_and_tokenizer
    from ..technique import ValidationContext

    net, tok = load_model_and_tokenizer(str(path))
    techniques = recipe.build()
    ctx = ValidationContext(recipe, net.config, dict(recipe.training_args))
    for t in techniques:  # model checks (no Linear, group size vs widths) before any work
        t.validate(ctx)
    log(f"hf_memkit: compressing {model} ({path}) with {', '.join(plan.names)}")
    pause_point("compress:loaded")
    from ..energy import EnergyMeter, describe

    meter = EnergyMeter(country).start()
    t0 = time.perf_counter()
    net, report, ppl_fp, ppl_q = _run_passes(net, tok, recipe, plan, evaluate, log)
    seconds = time.perf_counter() - t0
    energy = meter.stop()
    log(f"hf_memkit: {describe(energy)}")
    export = _write_output(net, tok, recipe, plan, output_dir, report, ppl_fp, ppl_q, overwrite, energy)
    from ..export.hub import folder_bytes

    log(f"hf_memkit: export in {output_dir} (manifest {output_dir}/memkit_export.json)")
    return {"model": model, "recipe": recipe.source, "techniques": plan.names, "format": export.format,
            "output_dir": output_dir, "seconds": round(seconds, 1), "perplexity_before": ppl_fp,
            "perplexity_after": ppl_q, "bytes_on_disk": folder_bytes(output_dir), "energy": energy}


def _check_not_source(path: Any, output_dir: str, overwrite: bool) -> None:
    """``--overwrite`` replaces the output folder whole: refuse it when that folder is (or holds) the model being
    compressed."""
    src, out = os.path.realpath(str(path)), os.path.realpath(output_dir)
    if src == out or src.startswith(out + os.sep):
        raise OutputDirError(
            f"the output folder {output_dir} {'is' if src == out else 'contains'} the model being compressed "
            f"({path}); replacing it{' (--overwrite)' if overwrite else ''} would delete the input. Choose another "
            "output folder")


def _run_passes(net: Any, tok: Any, recipe: Any, plan: Plan, evaluate: bool, log) -> tuple:
    from ..compress.passes import run_pass
    from .evaluate import corpus_perplexity

    ppl_fp = corpus_perplexity(net, tok) if evaluate else None
    if ppl_fp is not None:
        log(f"hf_memkit: eval perplexity before: {ppl_fp:.3f}")
    if plan.e2e is None:
        report = {}
        for pname, pcfg in plan.pruners:
            from ..compress.calibration import from_corpus
            from ..compress.capabilities import capability

            pcal = from_corpus(tok, pcfg.num_samples, pcfg.seq_len) if capability(pname, "calibrated") else None
            if pcal is not None:
                log(f"hf_memkit: calibration: {pcal.describe()}")
            report[pname] = run_pass(pname, net, pcfg, calibration=pcal)
        if plan.has_quant:
            qname, qcfg = plan.quantizer_or_default()
            calib = None
            if plan.quantizer_calibrated():
                from ..compress.calibration import from_corpus

                calib = from_corpus(tok, qcfg.num_samples, qcfg.seq_len)
                log(f"hf_memkit: calibration: {calib.describe()}")
            report.update(run_pass(qname, net, qcfg, lorc=plan.lorc, calibration=calib).to_dict())
    else:
        net, report = _train_e2e(net, tok, recipe, plan, log)
    ppl_q = corpus_perplexity(net, tok) if evaluate else None
    if ppl_q is not None:
        log(f"hf_memkit: eval perplexity after: {ppl_q:.3f}")
    return net, report, ppl_fp, ppl_q


def _write_output(net: Any, tok: Any, recipe: Any, plan: Plan, output_dir: str, report: dict, ppl_fp: Any,
                  ppl_q: Any, overwrite: bool, energy: dict | None = None) -> Any:
    """The export, its tokenizer and the compression report, staged together and renamed into place at once
    (so weights, config.json, model card and manifest always describe the same pass)."""
    from ..atomic import write_json
    from ..export.checkpoint import staged_export, write_export
    from ..recipe import ExportConfig

    export = recipe.export if recipe.export is not None else ExportConfig(format="compressed-tensors")
    metrics = {"perplexity_full_precision": ppl_fp, "perplexity": ppl_q, "energy": energy}
    if ppl_q is not None:
        from .evaluate import EVAL_BLOCKS, EVAL_SEQ_LEN

        metrics["perplexity_note"] = (f"Perplexity: {EVAL_BLOCKS} blocks of {EVAL_SEQ_LEN} tokens of the eval split "
                                      "of hf_memkit's embedded corpus (Python reference text)"
                                      + (", with the LoRC adapter." if plan.lorc is not None else "."))
    with staged_export(output_dir, overwrite=overwrite, replace_own=False) as tmp:
        kw = {"recipe": recipe, "tokenizer": tok, "metrics": metrics, "layout": export.sparse_layout}
        write_export(net, tmp, export, **({} if export.format == "safetensors" else kw))
        if export.format == "safetensors":
            from ..export.checkpoint import card_info
            from ..export.hub import write_card

            tok.save_pretrained(tmp)
            write_card(tmp, card_info(net, recipe, "safetensors", metrics, {}, None))
        write_json(os.path.join(tmp, REPORT_FILE), {"techniques": plan.names, "pass": report})
    return export


def _train_e2e(net: Any, tok: Any, recipe: Any, plan: Plan, log) -> tuple[Any, dict]:
    """The E2E-QP run: the recipe (quantizer before training, then scales-only training) on the corpus."""
    from transformers import TrainingArguments, default_data_collator

    from ..data.corpus import block_dataset, split_topics
    from ..integrations.memkit_trainer import MemkitTrainer

    qname, qcfg = plan.quantizer_or_default()
    args = dict(E2E_DEFAULTS, learning_rate=2e-5 if qcfg.bits == 2 else 1e-5)
    args.update(recipe.training_args)
    run_recipe = dataclasses.replace(recipe, export=None)  # the export goes to output_dir, written by the caller
    train_texts, _ = split_topics()
    with tempfile.TemporaryDirectory(prefix="memkit-e2e-") as tmp:
        targs = TrainingArguments(output_dir=tmp, disable_tqdm=True, **args)
        blocks = targs.max_steps * targs.per_device_train_batch_size * targs.gradient_accumulation_steps
        data = block_dataset(train_texts, tok, E2E_SEQ_LEN, max_blocks=max(blocks, 1))
        log(f"hf_memkit: e2e_qp: {targs.max_steps} steps x {targs.per_device_train_batch_size} x {E2E_SEQ_LEN} "
            f"tokens, learning rate {targs.learning_rate:g}")
        trainer = MemkitTrainer(model=net, args=targs, train_dataset=data, data_collator=default_data_collator,
                                processing_class=tok, recipe=run_recipe)
        trainer.train()
        report_path = os.path.join(tmp, REPORT_FILE)
        report = {}
        if os.path.isfile(report_path):
            with open(report_path, encoding="utf-8") as f:
                report = json.load(f).get("pass") or {}
        report["e2e_qp"] = {"steps": trainer.state.global_step,
                            "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h),
                                               None)}
    return trainer.model, report
