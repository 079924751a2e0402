"""``export:`` — what a run leaves for ``from_pretrained`` and the Hub.

* ``format: safetensors``: a plain HF folder; adapters merged (``merge_adapters``); layers quantized by a
  ``compress`` technique are written as their dequantized values (LoRC folded in), which loads anywhere and
  saves nothing.
* ``format: compressed-tensors``: a ``pack-quantized`` checkpoint (:mod:`.compressed_tensors`), the LoRC factors
  as a PEFT LoRA adapter in ``lorc_adapter/`` (:mod:`.lorc_adapter`), the tokenizer, and a model card with the
  recipe, the technique versions and the measured perplexity and size (:mod:`.hub`).

Every export is written into a temporary sibling folder, gets its manifest (``memkit_export.json``, see
:mod:`.hub`) and is renamed into place at the end (:func:`staged_export`): an interrupted export leaves the
previous export intact or nothing, never a mix. A folder hf_memkit did not write is never replaced
(:func:`check_output_dir`); one it wrote is replaced, never merged into.

:func:`export_model` dispatches on the format. ``RecipeRuntime.finalize`` calls :func:`export_safetensors`
whatever the format, so for ``compressed-tensors`` the last compress technique writes the export itself and marks
the model, and :func:`export_safetensors` then leaves that folder alone (once).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import MemkitError, RecipeError

logger = logging.getLogger("hf_memkit")

_MARK = "_memkit_exported"


class OutputDirError(MemkitError, FileExistsError):
    """An output folder holds something hf_memkit must not replace (or is not a folder)."""


def is_memkit_dir(path: "str | os.PathLike[str]") -> bool:
    from .hub import EXPORT_INFO

    return os.path.isfile(os.path.join(path, EXPORT_INFO))


def check_output_dir(path: "str | os.PathLike[str]", *, overwrite: bool = False, replace_own: bool = True,
                     flag: str = "--overwrite") -> None:
    """Refuse to write an export over ``path`` unless it is absent, empty, an hf_memkit export
    (``replace_own``) or ``overwrite`` is set. Called before any work, and again just before writing."""
    from ..atomic import recover_dir

    recover_dir(path)  # a crash between the two renames of an earlier export: that export is back first
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise OutputDirError(f"{p} exists and is not a folder; choose another output folder or remove it")
    if not p.exists() or not any(p.iterdir()) or overwrite or (replace_own and is_memkit_dir(p)):
        return
    why = "was not written by hf_memkit (it has no memkit_export.json)" if replace_own else "is not empty"
    raise OutputDirError(
        f"{p} {why}; hf_memkit writes an export into a folder of its own and replaces it whole, never merging "
        "into another. Choose a new or empty folder" + (f", or pass {flag} to replace {p} entirely" if flag else
                                                        f" (export.dir), or move {p} away")
    )


def export_target(output_dir: str, sub: str) -> str:
    """``output_dir/sub`` (a recipe's ``export.dir``), resolved, checked to lie inside ``output_dir`` and to be
    absent, empty or an earlier hf_memkit export."""
    out = Path(output_dir).resolve()
    target = (out / sub).resolve()
    if target == out or out not in target.parents:
        raise RecipeError(
            f"export.dir {sub!r} resolves to {target}, which is not a folder inside the output directory {out} "
            "(the export replaces its folder whole)", key="export.dir",
            fix="use a relative folder name below output_dir, e.g. `export: {dir: export}`")
    check_output_dir(target, flag="")
    return str(target)


@contextlib.contextmanager
def staged_export(out_dir: str, *, overwrite: bool = False, replace_own: bool = True) -> Iterator[str]:
    """``with staged_export(d) as tmp:`` write the export into ``tmp``; at exit it gets its manifest and replaces
    ``d`` whole. On an error ``d`` is untouched."""
    from ..atomic import atomic_dir, pause_point
    from .hub import write_manifest

    check_output_dir(out_dir, overwrite=overwrite, replace_own=replace_own)
    with atomic_dir(out_dir, fault_points=True) as tmp:
        yield str(tmp)
        pause_point("export:manifest")
        write_manifest(str(tmp))


def export_model(model: Any, out_dir: str, config: Any = None, *, recipe: Any = None, tokenizer: Any = None,
                 metrics: dict[str, Any] | None = None, model_card: bool = True) -> str:
    """Export ``model`` into ``out_dir`` as ``config`` (an :class:`~hf_memkit.recipe.ExportConfig`) says;
    ``model_card=False`` skips the README (and the perplexity it measures)."""
    from ..recipe import ExportConfig

    config = config if config is not None else ExportConfig()
    if config.format == "compressed-tensors":
        return export_compressed_tensors(model, out_dir, recipe=recipe, tokenizer=tokenizer, metrics=metrics,
                                         model_card=model_card, layout=config.sparse_layout)
    return export_safetensors(model, out_dir, merge_adapters=config.merge_adapters)


def write_export(model: Any, folder: str, config: Any, **kw: Any) -> None:
    """:func:`export_model` into ``folder`` as it is (no staging; the caller stages, e.g. ``memkit compress``)."""
    if config.format == "compressed-tensors":
        _write_compressed_tensors(model, folder, **kw)
    else:
        _write_safetensors(model, folder, merge_adapters=config.merge_adapters)


def export_safetensors(model: Any, out_dir: str, *, merge_adapters: bool = True) -> str:
    if _marked(model, out_dir):
        delattr(model, _MARK)  # one export per mark: a later call writes again
        logger.info("hf_memkit: %s already holds this run's compressed-tensors export", out_dir)
        return out_dir
    with staged_export(out_dir) as tmp:
        _write_safetensors(model, tmp, merge_adapters=merge_adapters)
    logger.info("hf_memkit: exported %s to %s", type(model).__name__, out_dir)
    return out_dir


def _write_safetensors(model: Any, out_dir: str, *, merge_adapters: bool = True) -> None:
    from peft import PeftModel

    target = model
    if isinstance(model, PeftModel):
        mergeable = getattr(model.base_model, "memkit_mergeable", True)  # MixLoRA: experts are routed per token
        if merge_adapters and mergeable and not _has_quantized_base(model):
            target = copy.deepcopy(model).merge_and_unload()
        else:
            if merge_adapters:
                logger.warning("hf_memkit: %s; exporting the adapter beside it instead of merging",
                               "the adapter has no merged form" if not mergeable else "the base is 4-bit")
    from ..compress.linear import quantized_modules

    if quantized_modules(target):
        target.save_pretrained(out_dir, state_dict=dense_state_dict(target), safe_serialization=True)
        logger.info("hf_memkit: %s: quantized layers written dequantized (format: safetensors; use format: "
                    "compressed-tensors for a packed checkpoint)", type(target).__name__)
        return
    target.save_pretrained(out_dir, safe_serialization=True)


def dense_state_dict(model: Any) -> dict[str, Any]:
    """The state dict a plain model with the same outputs has: quantized layers as their dequantized weight,
    with any LoRC branch folded in (``Ŵ + AB``)."""
    from ..compress.linear import lorc_factors, quantized_modules

    state = model.state_dict()
    for name, module, qw in quantized_modules(model):
        for local in ("weight_codes", "weight_scale", "weight_zero_point"):
            state.pop(f"{name}.{local}", None)
        w = qw.dequantize()
        f = lorc_factors(module)
        if f is not None:
            w = (w.double() + f[0].double() @ f[1].double()).to(w.dtype)
        state[f"{name}.weight"] = w.contiguous()
    return state


def _has_quantized_base(model: Any) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.base_model.modules())


def dense_bytes(model: Any) -> int:
    """Bytes of the model's weights in its own dtype without any quantization (tied tensors once)."""
    import torch

    from ..compress.linear import quantized_modules

    # training-time quantized layers (E2E-QP) hold codes and scales instead of a weight: count the weight
    packed = {n: qw for n, m, qw in quantized_modules(model) if type(m) is not torch.nn.Linear}
    seen, total = set(), 0
    for name, p in model.named_parameters():
        module, _, local = name.rpartition(".")
        if id(p) in seen or (module in packed and local != "bias"):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total + sum(qw.codes.numel() * qw.scale.element_size() for qw in packed.values())


def _mark(model: Any, out_dir: str) -> None:
    setattr(model, _MARK, (os.path.realpath(out_dir), "compressed-tensors"))


def _marked(model: Any, out_dir: str) -> bool:
    mark = getattr(model, _MARK, None)  # set here and by adapters.lorc.export (with abspath): compare resolved
    return bool(mark) and mark[1] == "compressed-tensors" and os.path.realpath(mark[0]) == os.path.realpath(out_dir)


def export_compressed_tensors(model: Any, out_dir: str, *, recipe: Any = None, tokenizer: Any = None,
                              metrics: dict[str, Any] | None = None, model_card: bool = True,
                              layout: str = "dense") -> str:
    with staged_export(out_dir) as tmp:
        _write_compressed_tensors(model, tmp, recipe=recipe, tokenizer=tokenizer, metrics=metrics,
                                  model_card=model_card, layout=layout)
    _mark(model, out_dir)
    logger.info("hf_memkit: compressed-tensors export in %s", out_dir)
    return out_dir


def _write_compressed_tensors(model: Any, out_dir: str, *, recipe: Any = None, tokenizer: Any = None,
                              metrics: dict[str, Any] | None = None, model_card: bool = True,
                              layout: str = "dense") -> None:
    import compressed_tensors

    from .. import __version__
    from ..atomic import pause_point
    from ..prune.targets import sparse_modules
    from ..compress.linear import quantized_modules
    from .compressed_tensors import write_checkpoint
    from .hub import folder_bytes, write_card
    from .lorc_adapter import ADAPTER_DIR

    if sparse_modules(model):  # 2:4 (with or without int4): sparsity_config + the sparse layout
        return _write_sparse(model, out_dir, layout=layout, recipe=recipe, tokenizer=tokenizer, metrics=metrics,
                             model_card=model_card)
    if not quantized_modules(model) and getattr(model, STRUCTURED_ATTR, None):
        return _write_structured(model, out_dir, tokenizer=tokenizer)
    written = write_checkpoint(model, out_dir)
    pause_point("export:weights")
    lorc, metrics = _side_files(model, out_dir, tokenizer, metrics)
    if lorc is not None:
        lorc["bytes_on_disk"] = folder_bytes(os.path.join(out_dir, ADAPTER_DIR))
    if model_card:
        if "perplexity" not in metrics and tokenizer is not None:
            from ..quant.evaluate import EVAL_BLOCKS, EVAL_SEQ_LEN, corpus_perplexity

            metrics["perplexity"] = corpus_perplexity(model, tokenizer)
            metrics.setdefault("perplexity_note", f"Perplexity: {EVAL_BLOCKS} blocks of {EVAL_SEQ_LEN} tokens of "
                               "the eval split of hf_memkit's embedded corpus (Python reference text), "
                               + ("with" if lorc else "without") + " the LoRC adapter.")
        info = card_info(model, recipe, "compressed-tensors", metrics, written, lorc)
        info["compressed_tensors_version"] = compressed_tensors.__version__
        info["hf_memkit_version"] = __version__
        write_card(out_dir, info)
    logger.info("hf_memkit: compressed-tensors checkpoint: %d quantized layers%s", len(quantized_modules(model)),
                f", LoRC adapter r{lorc['rank']}" if lorc else "")


STRUCTURED_ATTR = "_memkit_structured"


def export_structured(model: Any, out_dir: str, *, tokenizer: Any = None) -> str:
    """A structurally pruned model (fewer layers, narrower MLP) is an ordinary smaller checkpoint: a plain
    ``save_pretrained`` whose config already says the new sizes."""
    with staged_export(out_dir) as tmp:
        _write_structured(model, tmp, tokenizer=tokenizer)
    _mark(model, out_dir)
    return out_dir


def _write_structured(model: Any, out_dir: str, *, tokenizer: Any = None) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    logger.info("hf_memkit: structurally pruned model (%s layers, intermediate_size %s) saved as a plain checkpoint",
                model.config.num_hidden_layers, getattr(model.config, "intermediate_size", "?"))


def export_sparse(model: Any, out_dir: str, *, layout: str = "dense", recipe: Any = None, tokenizer: Any = None,
                  metrics: dict[str, Any] | None = None, model_card: bool = True) -> str:
    """2:4 sparse (optionally int4) compressed-tensors export (:mod:`.sparse_export`), the SLoRB/LoRC side
    branch as a PEFT LoRA beside it, the tokenizer and the model card."""
    with staged_export(out_dir) as tmp:
        _write_sparse(model, tmp, layout=layout, recipe=recipe, tokenizer=tokenizer, metrics=metrics,
                      model_card=model_card)
    _mark(model, out_dir)
    return out_dir


def _write_sparse(model: Any, out_dir: str, *, layout: str = "dense", recipe: Any = None, tokenizer: Any = None,
                  metrics: dict[str, Any] | None = None, model_card: bool = True) -> None:
    import compressed_tensors

    from .. import __version__
    from .hub import write_card
    from .sparse import write_sparse_checkpoint

    layout = getattr(getattr(recipe, "export", None), "sparse_layout", None) or layout
    written = write_sparse_checkpoint(model, out_dir, layout=layout)
    side, metrics = _side_files(model, out_dir, tokenizer, metrics)
    if model_card:
        info = card_info(model, recipe, "compressed-tensors", metrics, written, side)
        info["summary"] = ", ".join(written.get("groups", {})) or "2:4 sparse"
        info["compressed_tensors_version"] = compressed_tensors.__version__
        info["hf_memkit_version"] = __version__
        write_card(out_dir, info)


def card_info(model: Any, recipe: Any, fmt: str, metrics: dict[str, Any], written: dict[str, Any],
              lorc: dict[str, Any] | None) -> dict[str, Any]:
    from .card import base_model_id, techniques_of

    techniques = techniques_of(recipe)
    recipe_yaml = recipe.to_yaml() if recipe is not None else None
    _calibration_as_run(model, techniques)
    groups = written.get("groups", {})
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return {"base_model": base_model_id(model), "model_name": os.path.basename(str(name).rstrip("/")) or str(name),
            "format": fmt,
            "summary": ", ".join(groups) + (f" + LoRC r{lorc['rank']}" if lorc else ""),
            "techniques": techniques, "recipe_yaml": recipe_yaml, "metrics": metrics,
            "quantized_layers": len(written.get("quantized_layers", [])), "groups": groups, "lorc": lorc}


def _calibration_as_run(model: Any, techniques: list[dict[str, Any]]) -> None:
    """The card states the calibration the pass really used (the compression report's line), not the config's
    ``num_samples``/``seq_len``: with ``calibration: auto`` after training they are the training batches'."""
    report = getattr(model, "_memkit_compress_report", None)
    used = getattr(report, "calibration", None)
    if not used or used == "none":
        return
    for t in techniques:
        settings = t.get("settings", {})
        if "seq_len" in settings and "num_samples" in settings:
            settings.pop("seq_len")
            settings.pop("num_samples")
            settings["calibration_used"] = used


def find_export(path: str) -> str:
    """The hf_memkit export ``memkit export DIR`` works on: ``DIR`` itself, or a run's ``DIR/export``. Anything
    else (a training output without an export, a folder another tool wrote) is refused."""
    from ..atomic import recover_dir
    from ..errors import ModelSourceError
    from .hub import EXPORT_INFO, ForeignFolderError

    sub = os.path.join(path, "export")
    for candidate in (path, sub):
        recover_dir(candidate)  # an export interrupted between its two renames: the previous one is back
        if is_memkit_dir(candidate):
            return candidate
    if any(os.path.isfile(os.path.join(c, "config.json")) for c in (path, sub)):
        raise ForeignFolderError(
            f"{path} holds a model that hf_memkit did not export (no {EXPORT_INFO} in it or in {sub}), so `memkit "
            "export` will neither rewrite its README.md nor upload it (a training output also holds checkpoints "
            "and optimizer states). Export it first: `memkit compress MODEL --recipe r.yaml -o DIR`, or train with "
            "an `export:` section, then pass that folder")
    raise ModelSourceError(
        f"{path} holds no exported model (no {EXPORT_INFO} in it or in {sub}); write one with "
        f"`memkit compress MODEL --recipe r.yaml -o {path}`, or train with an `export:` section")


def check_export_dir(path: str, *, repo_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """``memkit export DIR``: find hf_memkit's export in ``DIR`` (or ``DIR/export``), check it against its
    manifest (every listed file there, with its size) and that its config and weights are complete, and rewrite
    its model card atomically (naming ``repo_id`` in the usage snippet when given)."""
    import json

    from ..errors import ModelSourceError
    from .hub import check_manifest, folder_bytes, read_export_info, write_card
    from .lorc_adapter import ADAPTER_DIR

    folder = find_export(path)
    check_manifest(folder)
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{folder}/config.json is missing or unreadable ({exc}); export it again") from None
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise ModelSourceError(f"{folder} is incomplete: {', '.join(missing)} missing; export it again")
    qc = config.get("quantization_config") or {}
    fmt = "compressed-tensors" if qc.get("quant_method") == "compressed-tensors" else (
        qc.get("quant_method") or "safetensors")
    info = read_export_info(folder) or {}
    info.setdefault("techniques", [])
    info.setdefault("model_name", os.path.basename(os.path.abspath(folder)))
    info["format"] = fmt
    info.setdefault("metrics", {})["bytes_on_disk"] = (
        folder_bytes(folder) - folder_bytes(os.path.join(folder, ADAPTER_DIR)))
    info["bytes_on_disk"] = info["metrics"]["bytes_on_disk"]
    if repo_id:
        info["repo_id"] = repo_id
    write_card(folder, info)
    return folder, info


def _side_files(model: Any, out_dir: str, tokenizer: Any, metrics: dict | None) -> tuple[dict | None, dict]:
    """Beside the weights: the LoRC side adapter (if any) and the tokenizer; the size metrics of the folder."""
    from .hub import folder_bytes
    from .lorc_adapter import ADAPTER_DIR, write_lorc_adapter

    side = write_lorc_adapter(model, os.path.join(out_dir, ADAPTER_DIR))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    metrics = dict(metrics or {})
    metrics.setdefault("bytes_full_precision", dense_bytes(model))
    metrics["bytes_on_disk"] = folder_bytes(out_dir) - folder_bytes(os.path.join(out_dir, ADAPTER_DIR))
    if side is not None:
        side["subfolder"] = ADAPTER_DIR
    return side, metrics
