"""One pruning pass over a model, in place: :func:`prune_model_` (recipes' ``finalize``, ``memkit compress``,
benchmarks). Checks run before any weight changes."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleModelError

if TYPE_CHECKING:  # pragma: no cover
    from ..compress.calibration import CalibrationData

logger = logging.getLogger("hf_memkit")

def default_config(name: str) -> Any:
    from ..compress.capabilities import PRUNER, capability, names_with
    from ..compress.passes import config_for

    if capability(name, "role") != PRUNER:
        raise IncompatibleModelError(f"unknown pruning pass {name!r}; use one of {', '.join(names_with(PRUNER))}")
    return config_for(name)


def prune_model_(model: Any, name: str, config: Any = None, *, calibration: "CalibrationData | None" = None,
                 key: str | None = None) -> dict[str, Any]:
    """Prune ``model`` in place with ``name`` (``magnitude_24`` | ``wanda_24`` | ``comp`` | ``l1_structured``)."""
    from ..compress.capabilities import capability

    config = config if config is not None else default_config(name)
    key = key or f"compress.{name}"
    if capability(name, "calibrated", False) and (calibration is None or not calibration.batches):
        raise IncompatibleModelError(
            f"{key}: {name} needs calibration data and none was given; pass calibration= (see "
            "hf_memkit.compress.calibration.from_corpus)")
    t0 = time.perf_counter()
    if capability(name, "leaves_nm", False):
        report = semi_structured_prune_(model, name, config, calibration, key)
    else:
        from ..export.checkpoint import STRUCTURED_ATTR
        from .comp.structured import structured_prune_

        report = structured_prune_(model, ratio=config.ratio, layer_share=getattr(config, "layer_share", 0.0),
                                   round_to=config.round_to, damp=getattr(config, "damp", 0.01),
                                   method="comp" if name == "comp" else "l1", calibration=calibration,
                                   key=key).to_dict()
        setattr(model, STRUCTURED_ATTR, report)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["calibration"] = calibration.describe() if calibration is not None else "none"
    logger.info("hf_memkit: %s done in %.1f s", name, report["seconds"])
    return report


def semi_structured_prune_(model: Any, name: str, config: Any, calibration: Any, key: str) -> dict[str, Any]:
    import torch

    from .activations import input_sq_sums
    from .masks import check_nm, magnitude_scores, nm_mask, wanda_scores
    from .targets import mark_sparse_, sparse_targets

    check_nm(config.n, config.m, key)
    targets = sparse_targets(model, config.skip_modules, key, config.m)
    sums = input_sq_sums(model, targets, calibration) if name == "wanda_24" else {}
    layers = {}
    with torch.no_grad():
        for n, lin in targets.items():
            score = wanda_scores(lin.weight, sums[n]) if name == "wanda_24" else magnitude_scores(lin.weight)
            mask = nm_mask(score, config.n, config.m, name=n)
            lin.weight.mul_(mask.to(lin.weight.dtype))
            mark_sparse_(lin, mask, f"{config.n}:{config.m}")
            layers[n] = {"shape": list(lin.weight.shape)}
    return {"pruner": name, "pattern": f"{config.n}:{config.m}", "layers": layers}
