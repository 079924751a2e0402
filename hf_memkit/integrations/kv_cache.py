"""What counts as a decoder layer's KV-cache argument (transformers 5 passes ``cache``, 4.x ``past_key_value(s)``,
GPT-2 ``layer_past``). Techniques that re-run a layer (token-wise recompute) must drop it: training needs no
cache, and a recompute must not append to one."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import Cache

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def is_kv_cache(name: str, value: Any) -> bool:
    return value is not None and (isinstance(value, Cache) or name in CACHE_KWARGS)
