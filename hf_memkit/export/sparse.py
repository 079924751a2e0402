"""2:4 sparse checkpoints in the compressed-tensors layout.

``config.json["quantization_config"]`` gets a ``sparsity_config`` (``sparsity_structure: "2:4"``, targets
``Linear``, the dense Linear layers in ``ignore``, the measured ``global_sparsity``). The tensors:

* ``sparse_layout: dense`` (default): the 2:4 weights as plain tensors with their exact zeros and
  ``sparsity_config.format: "dense"``; with int4 the base is the ``pack-quantized`` checkpoint of
  :mod:`.compressed_tensors` (a pruned zero is code ``z`` on the grid, so 2:4 survives the rounding). Plain
  ``AutoModelForCausalLM.from_pretrained`` loads both: this is the layout that round-trips on transformers 5.x
  with compressed-tensors 0.20, which removed its sparse compressors ("sparsity is removed for now" in its
  ``ModelCompressor``) and so cannot decompress a bitmask checkpoint on load.
* ``sparse_layout: bitmask``: ``sparse-24-bitmask`` tensors (``.compressed``/``.bitmask``/``.shape``,
  :mod:`hf_memkit.prune.sparse24`), about 9/16 of the dense bytes in 16-bit; for vLLM and older compressed-tensors
  readers, and :func:`load_bitmask_state_dict` here. Not combinable with int4 (compressed-tensors stores 2:4 +
  int4 only as ``marlin-24``, a GPU kernel layout).

Every layer is verified before writing: exactly 2 nonzeros per group of 4 of the mask, nothing outside it, and
for the bitmask layout ``decompress(compress(W)) == W`` bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ..atomic import write_json
from ..errors import IncompatibleModelError

logger = logging.getLogger("hf_memkit")

LAYOUTS = ("dense", "bitmask")


def _masks(model: Any) -> dict[str, tuple[Any, Any]]:
    from ..prune.targets import MASK_ATTR, sparse_modules

    return {n: (m, getattr(m, MASK_ATTR, None)) for n, m in sparse_modules(model)}


def check_sparse_(name: str, weight: Any, mask: Any) -> None:
    import torch

    from ..prune.masks import nm_counts

    w = weight.detach().cpu()
    if mask is None:
        if bool((nm_counts(w) > 2).any()):
            raise IncompatibleModelError(f"{name}: marked 2:4 but has more than 2 nonzeros in a group of 4")
        return
    mask = mask.to(torch.bool)
    if not bool((nm_counts(mask) == 2).all()) or bool((w[~mask] != 0).any()):
        raise IncompatibleModelError(f"{name}: its weight is not exactly 2:4 under its mask; project it first")


def sparsity_config(model: Any, names: list[str], fmt: str) -> dict[str, Any]:
    import torch

    total = zeros = 0
    for n, m in model.named_modules():
        if type(m) is torch.nn.Linear:
            total += m.weight.numel()
            zeros += int((m.weight == 0).sum()) if n in names else 0
    ignore = sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in names)
    return {"format": fmt, "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ignore,
            "global_sparsity": round(zeros / max(total, 1), 6)}


def write_sparse_checkpoint(model: Any, out_dir: str, *, layout: str = "dense") -> dict[str, Any]:
    """Write ``model`` (2:4 layers marked by a prune technique, optionally int-quantized) into ``out_dir``."""
    import compressed_tensors

    from ..prune import sparse24
    from ..compress.linear import quantized_modules

    if layout not in LAYOUTS:
        raise IncompatibleModelError(f"sparse_layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    masks = _masks(model)
    if not masks:
        raise IncompatibleModelError("no 2:4 sparse layer to export; run magnitude_24, wanda_24, ast or cast first")
    for name, (m, mask) in masks.items():
        check_sparse_(name, m.weight, mask)
    names = sorted(masks)
    quantized = quantized_modules(model)
    if quantized:
        if layout == "bitmask":
            raise IncompatibleModelError(
                "sparse_layout: bitmask cannot hold int-quantized weights (compressed-tensors stores 2:4 + int4 only "
                "as the GPU-kernel layout marlin-24); use sparse_layout: dense, which packs the int4 codes")
        from .compressed_tensors import write_checkpoint

        written = write_checkpoint(model, out_dir)
        _update_config(out_dir, lambda qc: qc.__setitem__("sparsity_config", sparsity_config(model, names, "dense")))
        written["sparse_layers"] = names
        return written
    state = model.state_dict()
    if layout == "bitmask":
        for name in names:
            m, mask = masks[name]
            w = state.pop(f"{name}.weight")
            t = sparse24.compress(w, mask, name=name)
            if not __import__("torch").equal(sparse24.decompress(t), w.detach()):
                raise IncompatibleModelError(f"{name}: sparse-24-bitmask round trip is not exact")
            state.update({f"{name}.{k}": v.cpu() for k, v in t.items()})
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    qc = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
          "format": "dense", "quantization_status": "compressed", "config_groups": {},
          "sparsity_config": sparsity_config(model, names, "dense" if layout == "dense" else "sparse-24-bitmask")}
    _update_config(out_dir, None, qc)
    logger.info("hf_memkit: wrote a 2:4 sparse checkpoint (%d layers, layout %s) to %s", len(names), layout, out_dir)
    return {"quantized_layers": [], "sparse_layers": names, "groups": {f"2:4 sparse ({layout})": len(names)},
            "quantization_config": qc}


def _update_config(out_dir: str, edit=None, replace: dict | None = None) -> None:
    path = os.path.join(out_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if replace is not None:
        config["quantization_config"] = replace
    if edit is not None:
        edit(config["quantization_config"])
    write_json(path, config, indent=2, sort_keys=True)  # atomic: never a 0-byte or half-edited config.json


def load_bitmask_state_dict(folder: str) -> dict[str, Any]:
    """The dense state dict of a ``sparse-24-bitmask`` folder (for readers without a sparse decompressor)."""
    from safetensors.torch import load_file

    from ..prune import sparse24

    state: dict[str, Any] = {}
    for fname in sorted(os.listdir(folder)):
        if fname.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, fname)))
    out: dict[str, Any] = {}
    for key in list(state):
        module, _, local = key.rpartition(".")
        if local == "bitmask":
            out[f"{module}.weight"] = sparse24.decompress({s: state[f"{module}.{s}"] for s in sparse24.SUFFIXES})
    for key, v in state.items():
        module, _, local = key.rpartition(".")
        if local not in sparse24.SUFFIXES or f"{module}.weight" not in out:
            out.setdefault(key, v)
    return out
