"""See the class docstring for the recipe key, the paper and when (not) to use it."""
from __future__ import annotations

from ..base import PruneCalibrationFields, SemiStructuredFields


class Wanda24Config(SemiStructuredFields, PruneCalibrationFields):
    """``compress: [{wanda_24: {}}]`` — one-shot activation-aware 2:4 pruning (Wanda).

    ```yaml
    compress: [{wanda_24: {num_samples: 64, seq_len: 256}}]
    export: {format: compressed-tensors}
    ```
    Reference: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (Wanda), ICLR
    2024. Score ``|W_ij| · ‖X_j‖₂`` with ``X`` the layer's inputs on calibration text; keep the 2 best of every 4
    consecutive inputs per row. Plain PyTorch equivalent: ``s = W.abs() * X.norm(dim=0)``, then the 2:4 top-k of
    magnitude_24 on ``s``. Statistics come from one forward pass of the dense model (the reference walks the
    layers with already-pruned inputs; one pass is cheaper and differs little). Runs after training.

    Not for: models without calibration text (use magnitude_24), or when a short training budget is available
    (ast/cast recover much more).
    """
