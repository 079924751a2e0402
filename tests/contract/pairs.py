"""Which technique pairs the recipe loader accepts (computed from the registry by the same code that writes the
README's technique × technique table, so the matrix grows with the registry), and the recipe of each."""

from __future__ import annotations

import functools

from hf_memkit.docs import classify_pairs


@functools.lru_cache(maxsize=None)
def classified() -> tuple[list, list]:
    """(accepted, refused): accepted holds (key, recipe) for every pair the loader takes, refused holds
    (key, reason) for every pair it refuses (same-slot pairs of one-technique slots are neither)."""
    accepted, refused = [], []
    for (a, b), (verdict, why, recipe) in classify_pairs().items():
        if verdict in ("ok", "composes"):
            accepted.append((f"{a}+{b}", recipe))
        elif verdict in ("refused", "engine"):
            refused.append((f"{a}+{b}", why))
    return accepted, refused
