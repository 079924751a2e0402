"""One quantization pass over a model, in place: a quantizer (rtn, gptq or block_ap), optionally followed per
layer by LoRC. :func:`quantize_model_` is the public entry point (recipes, ``memkit compress``, benchmarks).

Every check that can fail runs before any weight changes: the layers to quantize exist, the group size divides
each of their widths, none is quantized already, and calibration data is there when the quantizer needs it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import IncompatibleModelError
from ..compress.linear import is_quantized, require_targets, set_lorc_, set_quantized_
from ..compress.passes import PassReport

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..compress.calibration import CalibrationData

logger = logging.getLogger("hf_memkit")



def default_config(name: str) -> Any:
    """The default config of the quantizer ``name`` (its registered class's config, no name table)."""
    from ..compress.passes import config_for

    return config_for(name)


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
    from ..compress.capabilities import capability

    if capability(quantizer, "calibrated", False):
        from ..compress.layerwise import find_blocks

        find_blocks(model, key)
    return targets


def quantize_model_(model: Any, quantizer: str = "rtn", config: Any = None, *, lorc: Any = None,
                    calibration: "CalibrationData | None" = None, key: str | None = None) -> PassReport:
    """Quantize ``model``'s Linear layers in place with ``quantizer`` (``rtn`` | ``gptq`` | ``block_ap``) and
    ``config`` (its config class; defaults when None), then add LoRC factors per layer when ``lorc`` (a
    :class:`~hf_memkit.quant.lorc.config.LorcCompensatorConfig`) is given. ``calibration`` is required by gptq and block_ap."""
    import torch

    from ..compress.capabilities import QUANTIZER, capability, names_with

    if capability(quantizer, "role") != QUANTIZER:
        raise IncompatibleModelError(
            f"unknown quantizer {quantizer!r}; use one of {', '.join(names_with(QUANTIZER))}")
    config = config if config is not None else default_config(quantizer)
    key = key or f"compress.{quantizer}"
    targets = check_model(model, quantizer, config, key)
    if capability(quantizer, "calibrated", False) and (calibration is None or not calibration.batches):
        raise IncompatibleModelError(
            f"{key}: {quantizer} needs calibration data and none was given; pass calibration= (see "
            "hf_memkit.compress.calibration.from_corpus), or use rtn, which needs none"
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
    from ..compress.grid import rtn_quantize

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
    from ..compress.layerwise import block_outputs, capture_block_inputs, find_blocks
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
