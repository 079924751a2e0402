"""Which technique pairs the recipe loader accepts (computed from the registry by the same code that writes the
README's technique × technique table, so the matrix grows with the registry), and the recipe of each."""

from __future__ import annotations

import copy
import functools

from hf_memkit.docs import classify_pairs

#: matrix settings that let a technique's defining check bite on the 2-layer tiny model (LISA's default of two
#: active layers would train every layer there, so "frozen layers do not move" could not fail)
MATRIX_CONFIG = {"lisa": {"active_layers": 1}}


def for_matrix(recipe: dict) -> dict:
    """``recipe`` (a dict of default-config entries) with :data:`MATRIX_CONFIG` applied."""
    recipe = copy.deepcopy(recipe)
    for value in recipe.values():
        for entry in value if isinstance(value, list) else [value] if isinstance(value, dict) else []:
            for name, cfg in entry.items():
                if name in MATRIX_CONFIG and isinstance(cfg, dict):
                    cfg.update(MATRIX_CONFIG[name])
    return recipe


@functools.lru_cache(maxsize=None)
def classified() -> tuple[list, list]:
    """(accepted, refused): accepted holds (key, recipe) for every pair the loader takes, refused holds
    (key, reason) for every pair it refuses (same-slot pairs of one-technique slots are neither)."""
    accepted, refused = [], []
    for (a, b), (verdict, why, recipe) in classify_pairs().items():
        if verdict in ("ok", "composes"):
            accepted.append((f"{a}+{b}", for_matrix(recipe)))
        elif verdict in ("refused", "engine"):
            refused.append((f"{a}+{b}", why))
    return accepted, refused
