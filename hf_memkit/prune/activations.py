"""Calibration statistics gathered with forward hooks in one pass over the calibration batches: the per-column
sum of squared inputs of Linear layers (Wanda), the cosine between each decoder layer's input and output (layer
importance) and the Gram matrix ``AᵀA`` of each MLP's down-projection input (neuron scores, mask tuning)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..compress.calibration import CalibrationData


@contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model: Any, calib: "CalibrationData") -> None:
    import torch

    from ..compress.layerwise import model_device

    device = model_device(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in calib.batches:
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        model.train(was)


def input_sq_sums(model: Any, linears: dict[str, Any], calib: "CalibrationData") -> dict[str, Any]:
    """``Σ_tokens x_j²`` per input column of each Linear in ``linears``."""
    import torch

    sums = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for n, m in linears.items()}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += (x * x).sum(0)
        return fn

    with _hooks([m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]):
        _run(model, calib)
    return sums


def layer_cosines(model: Any, layers: Any, calib: "CalibrationData") -> list[float]:
    """Mean over tokens of ``cos(h_in, h_out)`` per decoder layer."""
    import torch

    acc = [[0.0, 0] for _ in layers]

    def hook(i):
        def fn(mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            acc[i][0] += float(cos.sum())
            acc[i][1] += cos.numel()
        return fn

    with _hooks([layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]):
        _run(model, calib)
    return [s / max(n, 1) for s, n in acc]


def down_input_grams(model: Any, downs: list[Any], calib: "CalibrationData") -> list[Any]:
    """``AᵀA`` (``[I, I]``, fp64) of each down-projection's input ``A = act(gate(x)) ⊙ up(x)``."""
    import torch

    grams = [torch.zeros(d.in_features, d.in_features, dtype=torch.float64, device=d.weight.device) for d in downs]

    def hook(i):
        def fn(mod, args):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[i] += a.T @ a
        return fn

    with _hooks([d.register_forward_pre_hook(hook(i)) for i, d in enumerate(downs)]):
        _run(model, calib)
    return grams
