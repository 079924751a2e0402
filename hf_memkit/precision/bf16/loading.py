"""Loading a checkpoint straight into 16 bits, so that no fp32 copy of the weights ever exists."""

from __future__ import annotations

from typing import Any


def load_dtype(recipe: Any) -> Any:
    """``torch.bfloat16`` / ``torch.float16`` when ``recipe`` (a Recipe, a file, a bundled name, a dict or None)
    stores weights in 16 bits (``precision: {bf16: {...}}``), else None. Pass it to
    :func:`hf_memkit.data.models.load_model_and_tokenizer` (``dtype=``) or ``from_pretrained(dtype=...)``: the
    patch then finds 16-bit Linear/Embedding weights and only widens what stays fp32 (norms, biases)."""
    if recipe is None:
        return None
    from ...recipe import load_recipe

    recipe = load_recipe(recipe)
    for spec in recipe.slot("precision"):
        technique = spec.build()
        dtype = getattr(technique, "load_dtype", None)
        if callable(dtype):
            return dtype()
    return None
