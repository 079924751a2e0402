from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...technique import TechniqueConfig

DEFAULT_BIAS_LAYERS = 2
DEFAULT_WEIGHT_LAYERS = (-1,)
DEFAULT_RATIO = 0.25


class SparseBudgetConfig(TechniqueConfig):
    """``budget: {mb: 2}`` — let the technique choose ``bias_layers``, ``weight_layers`` and the ratios itself."""

    mb: float = Field(..., gt=0, description="byte budget of the update in MiB: gradients + optimizer state + "
                      "saved activations + slice copies of what trains")
    batches: int = Field(4, ge=1, description="training batches of the contribution measurement")
    ratios: list[float] = Field([0.0, 0.125, 0.25, 0.5, 1.0], min_length=1,
                                description="the input-channel ratios a layer's weight may get")
    layers: int | None = Field(8, ge=1, description="only the last N decoder layers are candidates (null: all; "
                               "deeper layers rarely fit: every layer above the lowest trained one saves activations)")
    optimizer_bytes_per_param: float | None = Field(
        None, ge=0, description="optimizer state per trainable element the budget assumes; null: from the "
        "recipe's optimizer (8 for adamw and the stock Trainer, 2 for adamw_8bit)"
    )

    @model_validator(mode="after")
    def _ratios_in_range(self):
        bad = [r for r in self.ratios if not 0 <= r <= 1]
        if bad:
            raise ValueError(f"budget.ratios must lie in [0, 1]; got {bad}")
        return self


class SparseUpdateConfig(TechniqueConfig):
    """``schedule: [{sparse_update: {}}]`` — train only the biases and norm weights of the last ``bias_layers``
    decoder layers and a ``weight_ratio`` fraction of the input channels (largest L2 norm) of the Linear weights
    in ``weight_layers``; everything else is frozen, and the frozen channels get no gradient memory at all (the
    update lives in a small trainable slice, folded back into the weight for saving and on ``remove()``).

    ```yaml
    schedule: [{sparse_update: {bias_layers: 4, weight_layers: [-1, -2], weight_ratio: [0.5, 0.25]}}]
    # or: choose under a byte budget from a gradient measurement on 4 batches
    schedule: [{sparse_update: {budget: {mb: 8}}}]
    # or: int8 weights (per output channel), trained with Quantization-Aware Scaling
    schedule: [{sparse_update: {quantized: int8}}]
    ```
    Paper: Lin et al., "On-Device Training Under 256KB Memory" (NeurIPS 2022); reference mit-han-lab/tiny-training.
    Naive PyTorch equivalent: freeze everything, ``norm.weight.requires_grad_(True)`` for the last k layers, and
    for a chosen weight ``W.requires_grad_(True)`` plus ``W.grad[:, ~keep] = 0`` after backward — which still
    allocates a full gradient (and optimizer state) for ``W``; here only ``W[:, keep]`` has any.

    ``budget`` differs from the paper's search: the paper fine-tunes each candidate to measure its accuracy gain
    and runs an evolutionary search over the combinations; here one backward pass per batch measures each
    candidate's squared gradient norm (the first-order loss decrease of a gradient step on it), the gains are
    assumed additive as in the paper, and a greedy allocation by gain per byte picks the ratios.

    Not for: recovering from a large domain shift (a few channels of a few layers cannot carry it — use LoRA or
    a full fine-tune), models without Linear weights (GPT-2's Conv1D is not supported), or combination with an
    adapter or LISA (each decides what trains).
    """

    bias_layers: int | None = Field(None, ge=0, description="train the biases and norm weights of the last k "
                                    "decoder layers (k >= 1 also trains the final norm); null: 2, or chosen by budget")
    weight_layers: list[int] | None = Field(None, description="decoder layers whose Linear weights get a "
                                            "channel-sparse update, negative indices count from the end; null: "
                                            "[-1] (the last layer), or chosen by budget")
    weight_modules: list[str] = Field(["*"], min_length=1, description="fnmatch patterns of the Linear modules "
                                      "inside a layer to update (e.g. mlp.down_proj, self_attn.*); '*' = all")
    weight_ratio: float | list[float] | None = Field(
        None, description="fraction of input channels updated: one value, or one per entry of weight_layers; "
        "int(ratio * in_features) channels with the largest L2 norm; null: 0.25, or chosen by budget"
    )
    train_head: bool = Field(False, description="also train the output head (on models with tied embeddings this "
                             "trains the embedding matrix too)")
    quantized: Literal["int8"] | None = Field(None, description="int8: the updated layers run as per-channel "
                                              "fake-quantized int8 weights and train in int8 units")
    qas: bool = Field(True, description="with quantized: Quantization-Aware Scaling of the int8 weight gradients "
                      "(false trains with the raw, mis-scaled gradients). It matters for SGD, the paper's optimizer; "
                      "Adam-type optimizers normalise the gradient away, so their step is ~lr int8 units")
    layers_attribute: str | None = Field(None, description="dotted path of the decoder layer list; null finds it")
    budget: SparseBudgetConfig | None = Field(None, description="choose bias_layers, weight_layers and ratios "
                                              "under a byte budget instead (see the docstring)")

    @model_validator(mode="after")
    def _consistent(self):
        manual = [f for f in ("bias_layers", "weight_layers", "weight_ratio") if getattr(self, f) is not None]
        if self.budget is not None and manual:
            raise ValueError(f"budget chooses {', '.join(manual)} itself; remove them or remove budget")
        layers = self.layers()
        ratio = self.weight_ratio if self.weight_ratio is not None else DEFAULT_RATIO
        ratios = ratio if isinstance(ratio, list) else [ratio]
        bad = [r for r in ratios if not 0 < r <= 1]
        if bad:
            raise ValueError(f"weight_ratio must lie in (0, 1]; got {bad}")
        if isinstance(ratio, list) and len(ratio) != len(layers):
            raise ValueError(f"weight_ratio has {len(ratio)} values for {len(layers)} weight_layers; give one "
                             "ratio per layer, or a single ratio for all")
        if len(set(layers)) != len(layers):
            raise ValueError(f"weight_layers lists a layer twice: {layers}")
        return self

    def layers(self) -> list[int]:
        return list(self.weight_layers) if self.weight_layers is not None else list(DEFAULT_WEIGHT_LAYERS)

    def ratios(self) -> list[float]:
        r = self.weight_ratio if self.weight_ratio is not None else DEFAULT_RATIO
        return list(r) if isinstance(r, list) else [r] * len(self.layers())

    def num_bias_layers(self) -> int:
        return self.bias_layers if self.bias_layers is not None else DEFAULT_BIAS_LAYERS
