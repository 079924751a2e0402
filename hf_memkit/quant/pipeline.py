"""One quantization pass over a model, in place: a quantizer (rtn, gptq or block_ap), optionally followed per
layer by LoRC. :func:`quantize_model_` is the public entry point (recipes, ``memkit compress``, benchmarks).

Every check that can fail runs before any weight changes: the layers to quantize exist, the group size divides
each of their widths, none is quantized already, and calibration data is there when the quantizer needs it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import IncompatibleModelError
from .linear import is_quantized, require_targets, set_lorc_, set_quantized_

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .calibration import CalibrationData

logger = logging.getLogger("hf_memkit")

QUANTIZERS = ("rtn", "gptq", "block_ap")
CALIBRATED = ("gptq", "block_ap")


@dataclass
class PassReport:
    quantizer: str
    spec: dict[str, Any]
    lorc: dict[str, Any] | None = None
    calibration: str = "none"
    seconds: float = 0.0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"quantizer": self.quantizer, "spec": self.spec, "lorc": self.lorc, "calibration": self.calibration,
                "seconds": round(self.seconds, 2), "layers": self.layers, "blocks": self.blocks}


def default_config(name: str) -> Any:
    from .efficientqat.config import BlockAPConfig
    from .gptq.config import GPTQConfig
    from .rtn.config import RTNConfig

    return {"rtn": RTNConfig, "gptq": GPTQConfig, "block_ap": BlockAPConfig}[name]()


def check_model(model: Any, quantizer: str, config: Any, key: str | None = None) -> dict[str, Any]:
    """The Linear layers the pass will quantize; raises IncompatibleModelError naming the first problem."""
    key = key or f"compress.{quantizer}"
    targets = require_targets(model, config.skip_modules, key)
    spec = config.spec()
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, m in targets.items():
        shared = [o for o in owners.get(id(m.weight), []) if o != f"{name}.weight"]
        if shared:
            raise IncompatibleModelError(
                f"{key}: {name}.weight is the same tensor as {shared[0]} (tied weights); quantizing it would "
                f"quantize both. Keep {name!r} in skip_modules"
            )
        spec.check_width(m.in_features, name, key)
        if is_quantized(m):
            raise IncompatibleModelError(
                f"{key}: {name} is already quantized ({m.memkit_quant_spec.describe()}); list one quantizer per "
                "recipe and run it once"
            )
    if quantizer in CALIBRATED:
        from .layerwise import find_blocks

        find_blocks(model, key)
    return targets


def quantize_model_(model: Any, quantizer: str = "rtn", config: Any = None, *, lorc: Any = None,
                    calibration: "CalibrationData | None" = None, key: str | None = None) -> PassReport:
    """Quantize ``model``'s Linear layers in place with ``quantizer`` (``rtn`` | ``gptq`` | ``block_ap``) and
    ``config`` (its config class; defaults when None), then add LoRC factors per layer when ``lorc`` (a
    :class:`~hf_memkit.quant.lorc.config.LoRCConfig`) is given. ``calibration`` is required by gptq and block_ap."""
    import torch

    if quantizer not in QUANTIZERS:
        raise IncompatibleModelError(f"unknown quantizer {quantizer!r}; use one of {', '.join(QUANTIZERS)}")
    config = config if config is not None else default_config(quantizer)
    key = key or f"compress.{quantizer}"
    targets = check_model(model, quantizer, config, key)
    if quantizer in CALIBRATED and (calibration is None or not calibration.batches):
        raise IncompatibleModelError(
            f"{key}: {quantizer} needs calibration data and none was given; pass calibration= (see "
            "hf_memkit.quant.calibration.from_corpus), or use rtn, which needs none"
        )
    report = PassReport(quantizer, config.spec().to_dict(),
                        lorc.model_dump() if lorc is not None else None,
                        calibration.describe() if calibration is not None else "none")
    on_layer = _lorc_step(lorc, report) if lorc is not None else None
    t0 = time.perf_counter()
    with torch.no_grad():
        if quantizer == "rtn":
            _rtn_pass_(targets, config, report, on_layer)
        elif quantizer == "gptq":
            _gptq_pass_(model, targets, config, calibration, report, on_layer, key)
    if quantizer == "block_ap":
        from .efficientqat.block_ap import block_ap_

        block_ap_(model, targets, config, calibration, report, on_layer, key)
    report.seconds = time.perf_counter() - t0
    logger.info("hf_memkit: %s quantized %d layers (%s%s) in %.1f s", quantizer, len(targets),
                config.spec().describe(), f" + lorc r{lorc.rank}" if lorc is not None else "", report.seconds)
    return report


OnLayer = Callable[[str, Any, "torch.Tensor | None"], None]


def _lorc_step(lorc: Any, report: PassReport) -> OnLayer:
    from .lorc.lorc import lorc_factors

    def step(name: str, linear: Any, w0: "torch.Tensor") -> None:
        f = lorc_factors(w0, linear.weight, lorc.rank, factor_bits=lorc.factor_bits, dtype=linear.weight.dtype)
        if f.rank:
            set_lorc_(linear, f.A, f.B, {"rank": f.rank, "factor_bits": lorc.factor_bits})
        total = float((f.singular_values.double() ** 2).sum())
        kept = float((f.singular_values[:f.rank].double() ** 2).sum())
        report.layers.setdefault(name, {})["lorc_energy_kept"] = round(kept / total, 6) if total else 1.0

    return step


def _rtn_pass_(targets: dict[str, Any], config: Any, report: PassReport, on_layer: OnLayer | None) -> None:
    from .grid import rtn_quantize

    spec = config.spec()
    for name, m in targets.items():
        w0 = m.weight.detach().clone() if on_layer else None
        set_quantized_(m, rtn_quantize(m.weight.detach(), spec, mse=config.mse, dtype=m.weight.dtype))
        report.layers[name] = {"shape": list(m.weight.shape)}
        if on_layer:
            on_layer(name, m, w0)


def _gptq_pass_(model: Any, targets: dict[str, Any], config: Any, calibration: "CalibrationData",
                report: PassReport, on_layer: OnLayer | None, key: str) -> None:
    from .gptq.gptq import HessianAccumulator, gptq_quantize
    from .layerwise import block_outputs, capture_block_inputs, find_blocks
    from .progress import blocks_progress

    spec = config.spec()
    prefix, blocks = find_blocks(model, key)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, blocks[0], calibration)
        done = set()
        for bi, block in enumerate(blocks_progress(blocks, f"{key}: GPTQ", len(blocks))):
            mine = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{bi}.")}
            if mine:
                acc = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in mine.items()}
                hooks = [m.register_forward_hook(lambda mod, args, out, a=acc[n]: a.add_batch(args[0]))
                         for n, m in mine.items()]
                try:
                    block_outputs(block, inputs)
                finally:
                    for h in hooks:
                        h.remove()
                for n, m in mine.items():
                    w0 = m.weight.detach().clone() if on_layer else None
                    res = gptq_quantize(m.weight, acc.pop(n).H, spec, block_size=config.block_size, damp=config.damp,
                                        act_order=config.act_order, static_groups=config.static_groups,
                                        mse=config.mse, dtype=m.weight.dtype, key=f"{key}: {n}")
                    set_quantized_(m, res.weight)
                    report.layers[n] = {"shape": list(m.weight.shape), "gptq_loss": round(res.loss, 6)}
                    if on_layer:
                        on_layer(n, m, w0)
                    done.add(n)
            inputs.hidden = block_outputs(block, inputs)
            logger.debug("hf_memkit: %s: block %d/%d done", key, bi + 1, len(blocks))
    finally:
        model.train(was_training)
    rest = {n: m for n, m in targets.items() if n not in done}
    if rest:
        logger.warning("hf_memkit: %s: %s sit outside the decoder blocks; quantized with RTN (no Hessian)", key,
                       ", ".join(rest))
        _rtn_pass_(rest, config, report, on_layer)


# ---------------------------------------------------------------------------------------------------------
# post-training compression beside the trained model

#: per-module attributes and buffers a compress pass sets (quantization, LoRC, 2:4 marks)
_MODULE_ATTRS = ("memkit_quant_spec", "memkit_lorc", "memkit_sparsity", "memkit_sparsity_mask")
_MODULE_BUFFERS = ("weight_codes", "weight_scale", "weight_zero_point", "lorc_A", "lorc_B")
_MODEL_ATTRS = ("_memkit_compress_report", "_memkit_exported", "_memkit_structured")


@contextlib.contextmanager
def compress_aside(model: Any, plan: Any) -> Iterator[Any]:
    """Yield the model a post-training compress pass (``plan``, a :class:`~hf_memkit.quant.base.Plan`) may change
    and export; when the block exits, even on an error, ``model`` holds its trained weights again. The trained
    model and the compressed export are two outputs: ``trainer.save_model()`` after ``train()`` must write the
    former.

    Memory: the passes run in place on the live model as before (same device memory), and the trained
    parameters wait in host memory meanwhile (one CPU copy of the weights) and are copied back afterwards,
    together with the per-module quantization/LoRC/2:4 state as it was. A deep copy on the device would add the
    whole model to the peak at the end of training. Structural pruning (comp, l1_structured) rebuilds modules and
    edits the config, which copying values back cannot undo, so it runs on a deep copy (+1x the weights on the
    model's device while it runs; the copy has none of the training patches). Stage ``before`` (e2e_qp) yields the model itself: there the trained model *is*
    the quantized one."""
    if plan is None or plan.stage != "after":
        yield model
        return
    from .base import SEMI_STRUCTURED

    if any(name not in SEMI_STRUCTURED for name, _cfg in plan.pruners):
        import torch

        from ..integrations.patching import unpatched_copy

        # the copy without the training patches (Mesa's kernels, 16-bit storage forwards): it is exported as a
        # plain model, and pruning replaces its Linears
        work = unpatched_copy(model)
        # 16-bit storage keeps Linear/Embedding weights narrower than the rest and computes through its own
        # forwards, which the plain copy has not: the copy computes (and exports) in the widest dtype present,
        # exactly holding the stored values
        floats = {p.dtype for p in work.parameters() if p.is_floating_point()}
        if len(floats) > 1:
            widest = max(floats, key=lambda d: torch.finfo(d).bits)
            for p in work.parameters():
                if p.is_floating_point() and p.dtype != widest:
                    p.data = p.data.to(widest)
        yield work
        return
    saved = _snapshot(model)
    try:
        yield model
    finally:
        _restore(model, saved)


def _module_state(m: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({a: getattr(m, a) for a in _MODULE_ATTRS if hasattr(m, a)},
            {b: m._buffers[b] for b in _MODULE_BUFFERS if m._buffers.get(b) is not None})


def _snapshot(model: Any) -> dict[str, Any]:
    return {"params": {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()},
            "modules": {n: _module_state(m) for n, m in model.named_modules()},
            "model": {a: getattr(model, a) for a in _MODEL_ATTRS if hasattr(model, a)}}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _restore(model: Any, saved: dict[str, Any]) -> None:
    import torch

    from .linear import LORC_ATTR, clear_quantized_, set_lorc_

    for name, m in model.named_modules():
        attrs, bufs = saved["modules"].get(name, ({}, {}))
        now_attrs, now_bufs = _module_state(m)
        if _same(attrs, now_attrs) and _same(bufs, now_bufs):
            continue
        clear_quantized_(m)  # drops the codes, the spec and any LoRC branch with its forward hook
        for a in _MODULE_ATTRS:
            if hasattr(m, a):
                delattr(m, a)
        for b, t in bufs.items():
            if not b.startswith("lorc_"):
                m.register_buffer(b, t, persistent=False)
        for a, v in attrs.items():
            if a != LORC_ATTR:
                setattr(m, a, v)
        if LORC_ATTR in attrs:  # a branch that was there before (e.g. SLoRB) comes back with its hook
            set_lorc_(m, bufs["lorc_A"], bufs["lorc_B"], attrs[LORC_ATTR])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved["params"]:
                p.copy_(saved["params"][n].to(p.device, p.dtype))
    for a in _MODEL_ATTRS:
        if a in saved["model"]:
            setattr(model, a, saved["model"][a])
        elif hasattr(model, a):
            delattr(model, a)
