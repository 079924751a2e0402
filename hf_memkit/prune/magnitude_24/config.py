"""See the class docstring for the recipe key, the paper and when (not) to use it."""
from __future__ import annotations

from ..base import SemiStructuredFields


class Magnitude24Config(SemiStructuredFields):
    """``compress: [{magnitude_24: {}}]`` — one-shot 2:4 pruning by weight magnitude, the simplest baseline.

    ```yaml
    compress: [{magnitude_24: {}}]
    export: {format: compressed-tensors}
    ```
    Reference: the magnitude baseline of the N:M literature (Mishra et al. 2021, NVIDIA ASP). Plain PyTorch
    equivalent, per ``nn.Linear`` (not lm_head): ``g = W.view(out, in//4, 4); keep = g.abs().topk(2, -1)``; zero
    the rest (ties: the lower column wins). No calibration data, seconds to run, after training (``finalize``).

    Not for: quality-sensitive use without retraining (wanda_24 is better at the same cost with calibration
    text; ast/cast retrain into 2:4).
    """
