"""Hybrid structured pruning "after COMP" (Xu et al. 2025, arXiv 2501.15255) and its L1 baseline.

COMP's formulas are not public (only its abstract could be read, ``comp_cast_sst.md`` §1); every step below is
our own choice in the shape the abstract describes, and is named as such:

1. **Budget.** ``ratio`` of the decoder layers' parameters is removed; ``layer_share`` of that budget goes to
   whole layers (``round(layer_share · ratio · L)`` layers), the rest to MLP neurons, the same number in every
   kept layer (rounded to a multiple of ``round_to``) so the result is a standard config.
2. **Layer importance** (ShortGPT-style block influence, the usual form in this family; COMP's is unpublished):
   ``BI_l = 1 − mean_tokens cos(h_in, h_out)`` on calibration text; the lowest-BI layers are dropped.
3. **Neuron score** (ours; *not* COMP's "matrix condition-based" metric): with ``A`` the down-projection input
   on calibration text of the layer-dropped model and ``w_j`` down's column j, neuron j's output energy
   ``‖a_j‖²·‖w_j‖²``; the lowest are pruned.
4. **Mask tuning** (Kwon et al. 2022-style least squares, the likely reading of COMP's step): per kept layer,
   scales ``c`` of the kept neurons minimise ``‖A Wᵀ − A_K diag(c) W_Kᵀ‖²`` over calibration tokens. With
   ``G = (AᵀA) ⊙ (WᵀW)`` this is ``(G_KK + δ·mean(diag G_KK)·I) c = G_K,: · 1``, solved in closed form (no
   gradients) and folded into down's columns.

The L1 baseline drops no layers and prunes the same number of parameters as MLP neurons ranked by
``‖gate_j‖₁ + ‖up_j‖₁ + ‖down_{:,j}‖₁``, without rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import IncompatibleModelError

if TYPE_CHECKING:  # pragma: no cover
    from ...compress.calibration import CalibrationData


@dataclass
class StructuredReport:
    method: str
    ratio: float
    layers_before: int
    layers_dropped: list[int] = field(default_factory=list)
    intermediate_before: int = 0
    intermediate_after: int = 0
    params_before: int = 0
    params_after: int = 0
    layer_scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self), params_removed_fraction=round(1 - self.params_after / max(self.params_before, 1), 4))


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def plan_budget(num_layers: int, layer_params: int, hidden: int, intermediate: int, ratio: float,
                layer_share: float, round_to: int, key: str) -> tuple[int, int]:
    """(layers to drop, neurons to prune per kept layer)."""
    n_drop = min(int(layer_share * ratio * num_layers + 0.5), num_layers - 1)
    remaining = ratio * num_layers * layer_params - n_drop * layer_params
    per_neuron = 3 * hidden
    k = remaining / max((num_layers - n_drop) * per_neuron, 1)
    k = int(round(k / round_to)) * round_to if round_to > 1 else int(round(k))
    k = max(k, 0)
    if k >= intermediate:
        raise IncompatibleModelError(
            f"{key}: ratio {ratio} would prune {k} of {intermediate} MLP neurons per layer; lower the ratio or "
            "raise layer_share")
    return n_drop, k


def structured_prune_(model: Any, *, ratio: float, layer_share: float, round_to: int, method: str,
                      calibration: "CalibrationData | None", damp: float = 0.01, key: str = "compress") -> StructuredReport:
    import torch

    from ...integrations.structured import decoder_layers, drop_layers_, mlp_of, set_intermediate_size_, shrink_mlp_
    from ..activations import down_input_grams, layer_cosines

    _prefix, layers = decoder_layers(model, key)
    mlps = [mlp_of(layer, key) for layer in layers]
    inter = getattr(mlps[0][0], mlps[0][1]).out_features
    if any(getattr(m, g).out_features != inter for m, g, _u, _d in mlps):
        raise IncompatibleModelError(f"{key}: the decoder layers have different MLP widths; not a standard config")
    hidden = getattr(mlps[0][0], mlps[0][1]).in_features
    layer_params = sum(p.numel() for p in layers[0].parameters())
    report = StructuredReport(method, ratio, len(layers), intermediate_before=inter, params_before=_count(model))
    share = layer_share if method == "comp" else 0.0
    n_drop, k = plan_budget(len(layers), layer_params, hidden, inter, ratio, share, round_to, key)
    if method == "comp" and calibration is None:
        raise IncompatibleModelError(f"{key}: needs calibration data (layer and neuron scores, mask tuning)")
    if n_drop:
        cos = layer_cosines(model, layers, calibration)
        report.layer_scores = [round(1 - c, 6) for c in cos]
        order = sorted(range(len(layers)), key=lambda i: (report.layer_scores[i], i))
        report.layers_dropped = sorted(order[:n_drop])
        drop_layers_(model, report.layers_dropped, key)
        _prefix, layers = decoder_layers(model, key)
    if k:
        mlps = [mlp_of(layer, key) for layer in layers]
        keep_n = inter - k
        if method == "comp":
            downs = [getattr(m, d) for m, _g, _u, d in mlps]
            grams = down_input_grams(model, downs, calibration)
        for i, (layer, (mlp, g, u, d)) in enumerate(zip(layers, mlps)):
            down = getattr(mlp, d)
            W = down.weight.detach().double()
            if method == "comp":
                C = grams[i]
                D = W.T @ W
                score = torch.diagonal(C) * torch.diagonal(D)
            else:
                score = (getattr(mlp, g).weight.detach().abs().sum(1) + getattr(mlp, u).weight.detach().abs().sum(1)
                         + down.weight.detach().abs().sum(0)).double()
            order = torch.sort(-score, stable=True).indices  # highest first; ties: lower index kept
            keep = torch.sort(order[:keep_n]).values
            scale = None
            if method == "comp":
                G = C * D
                Gkk = G[keep][:, keep]
                rhs = G[keep].sum(1)
                lam = damp * float(torch.diagonal(Gkk).mean().clamp_min(1e-12))
                scale = torch.linalg.solve(Gkk + lam * torch.eye(keep_n, dtype=G.dtype, device=G.device), rhs)
            shrink_mlp_(layer, keep.to(down.weight.device), key, down_scale=scale)
        set_intermediate_size_(model, keep_n)
    report.intermediate_after = inter - k
    report.params_after = _count(model)
    return report
