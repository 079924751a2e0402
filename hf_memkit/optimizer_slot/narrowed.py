"""Helpers for stepping an inner optimizer with its param groups narrowed to a few parameters (gradient release
steps one parameter at a time; the 16-bit write-back steps one parameter or one slice at a time)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def positional_overrides_hidden(inner: Any) -> Iterator[None]:
    """bitsandbytes looks per-parameter overrides up by (group index, position in the group) and then by
    parameter id; inside a narrowed step every parameter sits at position 0, so only the id lookup is right."""
    mng = getattr(inner, "mng", None)
    positional = getattr(mng, "index2config", None)
    if not positional:
        yield
        return
    mng.index2config = {}
    try:
        yield
    finally:
        mng.index2config = positional
