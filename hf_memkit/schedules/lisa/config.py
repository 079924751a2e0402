from __future__ import annotations

from pydantic import Field

from ...technique import TechniqueConfig


class LisaConfig(TechniqueConfig):
    """``schedule: [{lisa: {}}]`` — every ``interval`` optimizer steps, ``active_layers`` decoder layers train,
    sampled uniformly without replacement; the parts in ``always_train`` (embeddings, output head, final norm)
    train throughout, everything else is frozen.

    ```yaml
    schedule: [{lisa: {active_layers: 2, interval: 20}}]
    optimizer: {adamw: {}}                 # any optimizer with per-parameter state (adamw, adamw_8bit, stock)
    ```
    Paper: Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
    Fine-Tuning" (2024); reference: OptimalScale/LMFlow ``DynamicLayerActivationCallback``. Naive PyTorch
    equivalent: every K steps ``for l in layers: l.requires_grad_(False)``, then
    ``for i in random.sample(range(N), γ): layers[i].requires_grad_(True)`` — which keeps the Adam moments of every
    layer it ever visited. Here the optimizer holds every layer's parameters from the start (so it never has to
    be rebuilt), and the state of a deactivated layer is deleted at each switch: memory stays at
    γ layers + always-trained parts, and a layer restarts from zero moments when it is drawn again.

    Not for: adapters (LoRA freezes the base, so there is nothing for LISA to rotate), ZeRO-3/FSDP flat
    parameters (flags and state are per flat buffer), or runs of fewer than ``interval`` steps (only one set of
    layers ever trains). Gradients and optimizer state shrink; activations barely do while the embeddings train
    (every layer's input then requires grad) — add gradient checkpointing or a fused loss for those, or leave
    ``embeddings`` out of ``always_train``. With tied embeddings (SmolLM2, Gemma, ...) the matrix still trains
    then, from the head's gradient only: its input-side gradient (rows of the batch's tokens) is dropped, which is
    a departure from the paper (embeddings and head always train) traded for the activations of the frozen prefix.
    """

    active_layers: int = Field(2, ge=1, description="γ: how many decoder layers train at a time")
    interval: int = Field(20, ge=1, description="K: optimizer steps between two draws of the active layers")
    always_train: list[str] = Field(
        ["embeddings", "lm_head", "final_norm"],
        description="what trains at every step: the roles embeddings, lm_head, final_norm, and/or fnmatch "
        "patterns of parameter names (e.g. 'model.layers.*.input_layernorm.weight'); [] trains only the "
        "sampled layers. On a model with tied embeddings, [lm_head, final_norm] trains the shared matrix through "
        "the head only (the embedding output is detached), so the layers below the lowest active one save no "
        "activations",
    )
    seed: int | None = Field(None, ge=0, description="seed of the layer sampler; null takes TrainingArguments.seed")
    drop_optimizer_state: bool = Field(
        True, description="delete the optimizer state of deactivated layers (false keeps it, as LMFlow does, "
        "and memory grows with every layer visited)"
    )
    layers_attribute: str | None = Field(
        None, description="dotted path of the decoder layer list (e.g. model.layers); null finds it for "
        "Llama-style, GPT-2, GPT-NeoX and OPT models"
    )
