"""See the class docstring for the recipe key, the paper and when (not) to use it."""
from __future__ import annotations

from pydantic import Field

from ..base import PruneCalibrationFields


class StructuredFields(PruneCalibrationFields):
    ratio: float = Field(0.2, gt=0, lt=0.9, description="fraction of the decoder layers' parameters to remove")
    round_to: int = Field(8, ge=1, description="the pruned MLP width is a multiple of this (kernel-friendly)")


class COMPConfig(StructuredFields):
    """``compress: [{comp: {ratio: 0.2}}]`` — hybrid structured pruning *after COMP*: drop whole decoder layers,
    prune the same number of MLP neurons in every kept layer, then rescale the kept neurons by least squares.

    ```yaml
    compress: [{comp: {ratio: 0.2, layer_share: 0.5, num_samples: 64}}]
    ```
    Reference: the pipeline of Xu et al., "Lightweight and Post-Training Structured Pruning for On-Device LLMs"
    (COMP, arXiv 2501.15255). Its formulas are not public, so this is **not** COMP: the layer score is
    ShortGPT's block influence ``1 − cos(h_in, h_out)``, the neuron score is the neuron's output energy
    ``‖a_j‖²‖w_down_j‖²`` (not COMP's condition-number metric), and mask tuning is a closed-form ridge least
    squares fit of the kept neurons' scales (Kwon et al. 2022 style); see :mod:`hf_memkit.prune.comp.structured`.
    Plain PyTorch equivalent: drop ``round(layer_share·ratio·L)`` layers with the smallest block influence; per
    kept layer ``keep = topk(score, I - k)``; ``c = solve(G[K,K] + δI, G[K,:].sum(1))`` with
    ``G = (AᵀA) * (WᵀW)``; ``down.weight[:, K] *= c``. The result is a standard config (fewer
    ``num_hidden_layers``, smaller ``intermediate_size``) that plain ``from_pretrained`` loads.

    Not for: attention-heavy savings (heads are not pruned), MLPs other than gate/up/down (Llama family), or
    ratios where a short fine-tune is affordable and needed (this recovers without gradients only).
    """

    layer_share: float = Field(0.5, ge=0, le=1, description="share of the removed parameters taken as whole "
                               "decoder layers (the rest as MLP neurons)")
    damp: float = Field(0.01, ge=0, description="ridge δ of the mask-tuning least squares, relative to the mean "
                        "diagonal")
